"""``prune-channels``: structured pruning over channel-dependency groups; shapes really shrink.

A group (``channel_groups``) is every tensor axis, weight slice and shape constant that must
lose the same channels: a Conv's output channels with the BatchNormalization, activations and
depthwise Convs after it and the next Conv's input channels; all inputs of a residual Add/Mul;
Concat/Split inputs at their offsets; the hidden dimension of an MLP (up and down
projections); whole attention heads through Reshape/Transpose. Removing channel ``j`` of a
group deletes one producer row, one consumer column and the ``j``-th entry of every
per-channel constant, so each surviving channel computes exactly what it did before:

    y = W2 · f(W1 x)  with f channel-wise   =>   y = W2[:, keep] · f(W1[keep, :] x)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_shrink.compiler import graph_edit
from onnx_shrink.compiler.data_aware import DataAwarePass
from onnx_shrink.compiler.options import (
    check_options,
    option,
    warn_no_change,
    warn_unmatched_exclusions,
)
from onnx_shrink.compiler.statistics import ChannelValues, Statistics, StatRequest
from onnx_shrink.passes import channel_refit, half_weights
from onnx_shrink.passes import reconstruct as refitting
from onnx_shrink.passes.channel_groups import (
    SOURCE_OPS,
    Key,
    constant,
)
from onnx_shrink.passes.group_growth import Group, lifted_groups
from onnx_shrink.passes.quant import quantized_already

logger = logging.getLogger(__name__)

NO_GROUPS = f"no {'/'.join(sorted(SOURCE_OPS))} with a constant weight"


def _none_reason(model: ir.Model) -> str:
    """``NO_GROUPS``, and where If/Loop/Scan bodies hold such layers, that it does not reach
    them: Silero VAD's 12 Convs sit in its If branches, and the reason read as if it had
    none."""
    inside = collections.Counter(
        node.op_type
        for graph in model.graphs()
        if graph is not model.graph
        for node in graph
        if node.op_type in SOURCE_OPS
        and len(node.inputs) > 1
        and constant(node.inputs[1]) is not None
    )
    if not inside:
        return NO_GROUPS
    layers = ", ".join(f"{n} {op}" for op, n in sorted(inside.items()))
    return (
        f"{NO_GROUPS} in the main graph; {layers} in If/Loop/Scan bodies, which it does not reach"
    )


Criterion = Literal["l1", "l2", "activation"]


@dataclasses.dataclass(frozen=True)
class PruneChannelsPass(DataAwarePass):
    """Remove the least important channels of every channel-dependency group.

    Rules:

    1. Groups grow from the output channels of each Conv/ConvTranspose/Gemm/MatMul with a
       constant weight through the ops ``channel_groups.RULES`` knows; a group that reaches a
       graph input or output, a Shape consumer, an unknown op, a computed Reshape shape or a
       grouped (not depthwise) Conv is declined, and the reason logged.
    2. Channels are scored by the L1 or L2 norm of the producers' weights (summed over the
       group's producers), or by the RMS of the producers' outputs on calibration data
       (``activation``); the ``ratio`` lowest-scoring are removed from each group.
    3. The kept count is the multiple of a step nearest to ``(1 - ratio)`` of the group: the
       step makes each source's kept elements a multiple of ``round_to``, halved while the
       group holds fewer than two steps (a 16-channel group can keep 8). A tie goes up unless
       that keeps the whole group; at least one step and ``min_channels`` are kept. A group
       whose rounded count is its size is left alone.
    4. Initializers, Reshape shape constants, Split sizes, depthwise ``group`` and value
       shapes are rewritten; a constant shared with nodes outside the group gets its own copy.
    5. Groups whose producers match ``exclude`` (a node name or regex) are not pruned; with
       ``heads=False``, a group that would have to remove whole attention heads is declined.
    6. ``reconstruct``: the layers that read removed channels (MatMul, Gemm, 1x1 Conv) get
       their kept input weights and bias refit by least squares to their original outputs on
       calibration data (``channel_refit``); others are logged as not refit. ``auto``: when the
       pass runs with statistics (``shrink()`` with data, or ``bind``), not when called alone.
    """

    name: ClassVar[str] = "prune-channels"
    rewrites_float_weights: ClassVar[bool] = True  # float ones only (compiler.pass_order)
    changes_shapes: ClassVar[bool] = True  # tensors keep their names, not their channels
    fits_weights_to_data: ClassVar[bool] = True  # channels chosen, layers refit on data

    ratio: float = option(
        0.3, "fraction of each group's channels removed", minimum=0.0, maximum=0.95
    )
    criterion: Criterion = option(
        "l2",
        "channel score: weight L1/L2 norm, or activation RMS",
        choices=("l1", "l2", "activation"),
    )
    round_to: int = option(
        16,
        "kept elements per source are a multiple of this (onnxruntime's NCHWc block)",
        minimum=1,
    )
    min_channels: int = option(1, "fewest channels a group keeps", minimum=1)
    exclude: tuple[str, ...] = option(
        (), "producer node names or regexes left unpruned", patterns=True
    )
    heads: bool = option(True, "prune whole attention heads through Reshape/Transpose")
    reconstruct: Literal["auto", "on", "off"] = option(
        "auto",
        "least-squares refit of the layers reading pruned channels (auto: with statistics)",
        choices=("auto", "on", "off"),
    )
    ridge: float = option(refitting.DEFAULT_RIDGE, "refit dampening x mean diag(G)", minimum=0)

    def __post_init__(self) -> None:
        check_options(self)

    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        pruned = [g for g in self.groups(model) if g.reason is None and self._keep(g) < g.channels]
        result: list[StatRequest] = []
        if self.criterion == "activation":
            result += [
                StatRequest(key.value.name, "channel_sqnorm", axis=key.axis)
                for group in pruned
                for key in _source_keys(group)
            ]
        if self.reconstruct != "off":
            result += channel_refit.requests(channel_refit.consumers(_consumer_nodes(pruned)))
        return list(dict.fromkeys(result))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Weight scores without reconstruction run alone; the rest needs ``bind``."""
        if self.criterion == "activation" or self.reconstruct == "on":
            return super().call(model)
        return self.apply(model, None)

    def apply(self, model: ir.Model, stats: Statistics | None) -> ir.passes.PassResult:
        warn_unmatched_exclusions(model, self.name, self.exclude)
        try:
            return self._prune(model, stats)
        finally:
            half_weights.restore(model)  # sliced, in their half type again

    def _prune(self, model: ir.Model, stats: Statistics | None) -> ir.passes.PassResult:
        plans, declined = [], []
        for group in self.groups(model):
            if group.reason is not None:
                declined.append(group.reason)
                logger.info("prune-channels: declined group of %s: %s", group.label, group.reason)
                continue
            keep = self._keep(group)
            if keep >= group.channels:
                declined.append(self._kept_whole(group))
                logger.info("prune-channels: %s keeps its %d channels", group.label, keep)
                continue
            scores = channel_scores(group, self.criterion, stats)
            removed = np.sort(np.argsort(scores, kind="stable")[: group.channels - keep])
            logger.debug("prune-channels: %s: %d -> %d", group.label, group.channels, keep)
            plans.append((group, removed))
        if not plans:
            already = quantized_already.note(model.graph)
            none = _none_reason(model)
            warn_no_change(self.name, "channel group", declined, none=none, note=already)
            return ir.passes.PassResult(model, False)
        if stats is not None and self.reconstruct != "off":
            found = channel_refit.consumers(_consumer_nodes([g for g, _ in plans]))
            reports = channel_refit.refit_all(found, cuts_of(plans), stats, self.ridge)
            channel_refit.log_table(reports)
            channel_refit.warn_few_rows(reports)
        rewrite(model, plans)
        logger.info("prune-channels: pruned %d groups", len(plans))
        return ir.passes.PassResult(model, True)

    def _keep(self, group: Group) -> int:
        return kept_channels(group, self.ratio, self.round_to, self.min_channels)

    def _kept_whole(self, group: Group) -> str:
        """Why ``group`` keeps every channel at these options (``kept_channels``)."""
        if group.channels <= self.min_channels:
            return f"no more channels than min_channels={self.min_channels}"
        return f"ratio={self.ratio:g} rounds to no channel at round_to={self.round_to}"

    def groups(self, model: ir.Model) -> list[Group]:
        """Every candidate group; those whose producers ``exclude`` names carry the reason
        "excluded" (``lifted_groups``)."""
        return lifted_groups(model, self.exclude, lambda group: group.sources, heads=self.heads)


def kept_channels(group: Group, ratio: float, round_to: int, min_channels: int) -> int:
    """Channels kept (rule 3).

    Why multiples of 16: onnxruntime's CPU Conv runs in the NCHWc layout with channel blocks
    of 16 on AVX-512 (8 on AVX2). A count between blocks is padded up to the next block, and
    the pools, Adds and activations after it leave the blocked layout (reorders appear), so
    32 -> 24 channels is *slower* than 32 (digits: 1.16x the unpruned time) while 32 -> 16 is
    faster. A multiple of 16 is a multiple of 8 as well.
    """
    unit = min(k.unit for k in _source_keys(group) or group.keys)
    step = round_to // math.gcd(round_to, unit)
    while step > 1 and group.channels < 2 * step:
        step = -(-step // 2)
    target = group.channels * (1.0 - ratio)
    lower = math.floor(target / step) * step
    upper = lower + step
    below, above = target - lower, upper - target
    keep = lower if below < above or (below == above and upper >= group.channels) else upper
    return min(max(keep, step, min_channels), group.channels)


def _consumer_nodes(groups: Sequence[Group]) -> list[ir.Node]:
    """Weighted layers that lose input channels (their weight is sliced but not scored)."""
    return [
        p.node
        for g in groups
        for p in g.params
        if p.index == 1 and not p.source and p.node.op_type in SOURCE_OPS
    ]


def _source_keys(group: Group) -> list[Key]:
    return [k for k in group.keys if k.value.producer() in group.sources]


def channel_scores(group: Group, criterion: str, stats: Statistics | None) -> np.ndarray:
    """One importance score per channel of the group (rule 2)."""
    n = group.channels
    total = np.zeros(n, dtype=np.float64)
    if criterion == "activation":
        for key in _source_keys(group):
            result = stats.get(key.value.name, "channel_sqnorm", axis=key.axis) if stats else None
            if not isinstance(result, ChannelValues):
                raise ir.passes.PreconditionError(f"no channel_sqnorm for {key.value.name}")
            values = result.values[key.start : key.start + key.length]
            total += values.reshape(n, key.unit).sum(axis=1) / max(result.rows, 1)
        return np.sqrt(total)
    for param in group.params:
        if not param.source:
            continue
        weight = np.moveaxis(constant(param.node.inputs[param.index]), param.axis, 0)
        rows = weight[param.start : param.start + n * param.unit].reshape(n, -1)
        rows = rows.astype(np.float64)
        total += np.abs(rows).sum(axis=1) if criterion == "l1" else (rows**2).sum(axis=1)
    return total if criterion == "l1" else np.sqrt(total)


# ---- rewrite (rule 4) ----------------------------------------------------------------


def cuts_of(plans: list[tuple[Group, np.ndarray]]) -> dict[tuple[ir.Node, int], dict]:
    """(node, input index) -> {axis: elements removed}, over every plan."""
    cuts: dict[tuple[ir.Node, int], dict[int, set[int]]] = collections.defaultdict(dict)
    for group, removed in plans:
        for param in group.params:
            rows = _elements(param.start, param.unit, removed)
            cuts[param.node, param.index].setdefault(param.axis, set()).update(rows)
    return cuts


def rewrite(model: ir.Model, plans: list[tuple[Group, np.ndarray]]) -> None:
    """Delete each group's removed channels everywhere at once (offsets stay original)."""
    cuts = cuts_of(plans)
    shapes: collections.Counter[tuple[ir.Value, int]] = collections.Counter()
    edits: collections.Counter[tuple[ir.Node, str, int]] = collections.Counter()
    for group, removed in plans:
        for key in group.keys:
            shapes[key.value, key.axis] += len(removed) * key.unit
        for edit in group.edits:
            edits[edit.node, edit.kind, edit.position] += len(removed) * edit.factor
    _cut_constants(model.graph, cuts)
    for (value, axis), count in shapes.items():
        if value.shape is not None and isinstance(value.shape[axis], int):
            dims = list(value.shape)
            dims[axis] -= count
            value.shape = ir.Shape(dims)
    _apply_edits(model.graph, edits)
    common_passes.RemoveUnusedNodesPass()(model)


def _elements(start: int, unit: int, channels: np.ndarray) -> list[int]:
    return (start + channels[:, None] * unit + np.arange(unit)[None, :]).ravel().tolist()


def _cut_constants(graph: ir.Graph, cuts: dict[tuple[ir.Node, int], dict[int, set[int]]]) -> None:
    """Slice each constant in place when all its users agree, else give users their copy."""
    by_value: dict[ir.Value, list[tuple[ir.Node, int, dict[int, set[int]]]]] = {}
    for (node, index), axes in cuts.items():
        by_value.setdefault(node.inputs[index], []).append((node, index, axes))
    for value, users in by_value.items():
        array = value.const_value.numpy()
        specs = {_spec(axes) for _, _, axes in users}
        private = len(specs) > 1 or len(value.uses()) != len(users)
        for number, (node, index, axes) in enumerate(users):
            cut = array
            for axis, rows in axes.items():
                cut = np.delete(cut, sorted(rows), axis=axis)
            if not private:
                value.const_value = ir.tensor(cut, name=value.name)
                value.shape = ir.Shape(cut.shape)
                break
            copy = _initializer(graph, f"{value.name}_pruned{number}", cut)
            half_weights.mark_like(copy, value)  # stored in half precision again, if it was
            node.replace_input_with(index, copy)


def _spec(axes: dict[int, set[int]]) -> tuple:
    return tuple(sorted((axis, tuple(sorted(rows))) for axis, rows in axes.items()))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return graph_edit.add_initializer(graph, graph_edit.free_initializer_name(graph, name), array)


def _apply_edits(graph: ir.Graph, edits: collections.Counter) -> None:
    """Reshape shapes and Split sizes get per-node copies; depthwise ``group`` shrinks."""
    per_input: dict[tuple[ir.Node, int], dict[int, int]] = collections.defaultdict(dict)
    for (node, kind, position), count in edits.items():
        if kind == "group":
            group = node.attributes.get_int("group", 1) - count
            node.attributes["group"] = ir.AttrInt64("group", group)
        else:
            per_input[node, 1][position] = count
    for (node, index), counts in per_input.items():
        numbers = constant(node.inputs[index]).copy()
        for position, count in counts.items():
            numbers[position] -= count
        name = f"{node.inputs[index].name}_{node.name or node.op_type}"
        node.replace_input_with(index, _initializer(graph, name, numbers))
