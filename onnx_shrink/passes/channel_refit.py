"""Channel reconstruction: refit the layers that read pruned channels from their input's Gram.

Removing input channels of a consumer ``y = W x + b`` leaves ``W[:, S] x_S + b``; the output
loses the removed channels' contribution, mean included (after a Relu it is never zero). The
refit picks the kept weights ``V`` and a new bias ``c`` that reproduce the *original* output
best over the calibration rows ``X`` of the consumer's input:

    min_{V, c} ||X W^T + b - X_S V^T - c||^2   =   reconstruct.refit on the Gram of [X, 1]

and ``[X, 1]^T [X, 1] = [[X^T X, X^T 1], [1^T X, rows]]`` is what a ``gram`` request returns,
so no row of X is ever kept. The statistics are those of the model before pruning: each layer
is fitted to the original input, not to what earlier pruned layers feed it.

Consumers handled: MatMul with a 2-D constant weight (bias: a constant vector Added right
after it), Gemm with ``transA=0``, 1x1 Conv with ``group=1`` (a pixel is a row; with a stride
the rows are all pixels, a superset of those it reads) and 2-D Conv with ``group=1`` (a row is
an im2col patch, ``C * kh * kw`` columns; removing a channel removes its kh*kw columns).
Grouped Convs, other ranks and shared weights are reported as not refit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.statistics import Gram, Statistics, StatRequest
from onnx_shrink.passes import reconstruct

logger = logging.getLogger(__name__)

Cuts = Mapping[tuple[ir.Node, int], Mapping[int, set[int]]]
"""(node, input index) -> {axis: removed elements}, as ``prune_channels.rewrite`` cuts them."""


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A layer whose input channels can be refit: weight rows are ``[outputs, K]``."""

    node: ir.Node
    axis: int
    """the channel axis of the input tensor (the Gram's axis)"""
    weight_axis: int
    """the axis of the weight that runs over the input channels"""
    bias: ir.Value | None
    patch: tuple[int, ...] = ()
    """a kxk Conv's im2col geometry (``StatRequest.patch``); empty: a pixel or row is a row"""

    @property
    def request(self) -> StatRequest:
        return StatRequest(self.node.inputs[0].name, "gram", axis=self.axis, patch=self.patch)

    @property
    def per_channel(self) -> int:
        """Columns of the rows view per input channel (kh * kw for a Conv)."""
        return self.patch[0] * self.patch[1] if self.patch else 1

    def rows(self, weight: np.ndarray) -> np.ndarray:
        """``[outputs, K]`` from the weight (Conv ``[M, C, kh, kw]``, ``[K, N]`` or ``[N, K]``)."""
        if weight.ndim >= 3:
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.weight_axis == 0 else weight

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) > 2:
            return rows.reshape(shape)
        return rows.T if self.weight_axis == 0 else rows


@dataclasses.dataclass(frozen=True)
class RefitReport:
    layer: str
    removed: int
    inputs: int
    error: float | None
    """relative output error on the calibration rows, pruned without refit (None: not refit)"""
    refit_error: float | None
    reason: str | None = None
    rows: int | None = None
    """calibration rows the consumer's Gram came from (None: no Gram)"""


def consumer(node: ir.Node) -> Consumer | str:
    """The refittable view of ``node``'s weight (input 1), or why there is none."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return "weight is not constant"
    if len(weight.uses()) != 1:
        return "weight is shared"
    rank = len(weight.const_value.shape)
    if node.op_type == "MatMul" and rank == 2:
        return Consumer(node, -1, 0, _matmul_bias(node))
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1"
        bias = _own_constant(node.inputs[2] if len(node.inputs) > 2 else None)
        return Consumer(node, 1, 1 if node.attributes.get_int("transB", 0) else 0, bias)
    if node.op_type == "Conv":
        bias = _own_constant(node.inputs[2] if len(node.inputs) > 2 else None)
        kernel = tuple(weight.const_value.shape)[2:]
        if node.attributes.get_int("group", 1) != 1:
            return "grouped Conv"
        if all(k == 1 for k in kernel):
            return Consumer(node, 1, 1, bias)
        patch = _patch(node, kernel)
        return Consumer(node, 1, 1, bias, patch) if patch else _unpatched(node, kernel)
    if node.op_type == "MatMul":
        return f"MatMul weight of rank {rank}"
    return f"{node.op_type} is not refit (Conv, Gemm and MatMul are)"


def _unpatched(node: ir.Node, kernel: tuple[int, ...]) -> str:
    """Why ``_patch`` has no patch for a Conv: PP-OCRv6's 2x2 SAME_UPPER Convs read
    'Conv that is not 2-D'."""
    if len(kernel) != 2:
        return f"{len(kernel)}-D Conv"
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    return f"Conv with auto_pad={auto_pad} (pads set by the input's size)"


def _patch(node: ir.Node, kernel: tuple[int, ...]) -> tuple[int, ...] | None:
    """(kh, kw, sh, sw, dh, dw, top, left, bottom, right) of a 2-D Conv with explicit pads."""
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if len(kernel) != 2 or auto_pad not in ("NOTSET", "VALID"):
        return None
    strides = node.attributes.get_ints("strides", None) or (1, 1)
    dilations = node.attributes.get_ints("dilations", None) or (1, 1)
    pads = node.attributes.get_ints("pads", None) or (0, 0, 0, 0)
    return (*kernel, *strides, *dilations, *pads)


def _own_constant(value: ir.Value | None) -> ir.Value | None:
    """A constant bias read by this layer only (a shared one cannot be refit)."""
    if value is None or value.const_value is None or len(value.uses()) != 1:
        return None
    return value if value.is_initializer() else None


def _matmul_bias(node: ir.Node) -> ir.Value | None:
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    bias = _own_constant(other)
    return bias if bias is not None and len(bias.const_value.shape) == 1 else None


def consumers(nodes: Iterable[ir.Node]) -> dict[ir.Node, Consumer | str]:
    return {node: consumer(node) for node in dict.fromkeys(nodes)}


def requests(found: Mapping[ir.Node, Consumer | str]) -> list[StatRequest]:
    return [c.request for c in found.values() if isinstance(c, Consumer)]


def refit_all(
    found: Mapping[ir.Node, Consumer | str], cuts: Cuts, stats: Statistics, ridge: float
) -> list[RefitReport]:
    """Refit every consumer in place (full size; ``rewrite`` then cuts the removed inputs)."""
    reports = []
    for node, view in found.items():
        if isinstance(view, str):
            reports.append(RefitReport(_label(node), 0, 0, None, None, view))
            continue
        removed = cuts.get((node, 1), {}).get(view.weight_axis, set())
        if removed:
            reports.append(_refit(view, removed, stats, ridge))
    return reports


def _refit(view: Consumer, removed: set[int], stats: Statistics, ridge: float) -> RefitReport:
    gram = stats.get(view.request.tensor, "gram", axis=view.axis, patch=view.patch)
    weight = view.node.inputs[1]
    original = weight.const_value.numpy()
    rows = view.rows(original).astype(np.float64)
    label, inputs = _label(view.node), rows.shape[1]
    if not isinstance(gram, Gram) or gram.rows == 0 or gram.matrix.shape[0] != inputs:
        return RefitReport(label, len(removed), inputs, None, None, "no Gram statistics")
    keep = np.ones(rows.shape, dtype=bool)
    per = view.per_channel
    keep[:, [c * per + k for c in sorted(removed) for k in range(per)]] = False
    bias = view.bias.const_value.numpy() if view.bias is not None else None
    if bias is not None and bias.size == rows.shape[0] and gram.sums is not None:
        # [X, 1]: the bias is the weight of a constant input that is never removed.
        rows = np.concatenate([rows, bias.reshape(-1, 1).astype(np.float64)], axis=1)
        keep = np.concatenate([keep, np.ones((rows.shape[0], 1), bool)], axis=1)
        matrix = np.block([[gram.matrix, gram.sums[:, None]], [gram.sums[None, :], gram.rows]])
    else:
        bias, matrix = None, gram.matrix
    refitted = reconstruct.refit_measured(rows, keep, matrix, ridge)
    fitted, refit_error, error = refitted.rows, refitted.error, refitted.pruned_error
    if refit_error >= error:  # dampening can lose on tiny data: never make a layer worse
        return RefitReport(
            label, len(removed), inputs, error, error, "refit did not help", rows=int(gram.rows)
        )
    if bias is not None:
        new_bias = fitted[:, -1].reshape(bias.shape).astype(bias.dtype)
        view.bias.const_value = ir.tensor(new_bias, name=view.bias.name)
        fitted = fitted[:, :-1]
    new = view.unrows(fitted, original.shape).astype(original.dtype)
    weight.const_value = ir.tensor(new, name=weight.name)
    return RefitReport(label, len(removed), inputs, error, refit_error, rows=int(gram.rows))


def _label(node: ir.Node) -> str:
    return node.name or node.op_type


def log_table(reports: Sequence[RefitReport]) -> None:
    if not reports:
        return
    """Each consumer's own output error, pruned then refit, under -v. A footer says what the
    figures are not: on openWakeWord's embedding CNN the last layer read 1.7e-05 while the
    model's output was 0.29 off (errors compound, and that layer fit its few rows)."""
    lines = [f"{'consumer':<48} {'inputs removed':>15}  own output error (calibration rows)"]
    for r in reports:
        if r.error is None:
            lines.append(f"{r.layer[-48:]:<48} {'':>15}  not refit: {r.reason}")
            continue
        note = f" ({r.reason})" if r.reason else ""
        if r.rows is not None and r.rows < r.inputs:
            note += f" (fit to {r.rows} rows, fewer than its inputs)"
        lines.append(
            f"{r.layer[-48:]:<48} {f'{r.removed}/{r.inputs}':>15}  "
            f"{r.error:.2e} -> {r.refit_error:.2e}{note}"
        )
    lines.append(
        "each on the float model's inputs to it: the errors compound through the model, whose "
        "outputs the check measures"
    )
    logger.info("prune-channels: reconstruction\n%s", "\n".join(lines))
    skipped = collections.Counter(r.reason for r in reports if r.error is None)
    if skipped:
        # Said once, at warning level: on silero-vad v6 every consumer was a 1-D Conv, and the
        # refit asked for (the default with data) did nothing, said only under -v.
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common())
        logger.warning(
            "prune-channels: %d of %d layers reading pruned channels are not refit (%s); "
            "their error is the pruning's (-v lists them)",
            sum(skipped.values()),
            len(reports),
            reasons,
        )


def warn_few_rows(reports: Sequence[RefitReport]) -> None:
    """One warning for the refit consumers whose Gram comes from fewer calibration rows than
    they have inputs: their refit can follow those samples exactly (openWakeWord's timer head,
    48 rows for a 3264-wide Gemm: 94 dB SNR on them, 15 dB on other clips)."""
    few = [
        f"{r.layer} ({r.rows} < {r.inputs})"
        for r in reports
        if r.reason is None and r.rows is not None and r.rows < r.inputs
    ]
    if few:
        logger.warning(
            "prune-channels: %d refit layer(s) saw fewer calibration rows than they have "
            "inputs, e.g. %s: their refit can follow those samples closely; calibrate on more, "
            "and check on others",
            len(few),
            ", ".join(few[:3]),
        )
