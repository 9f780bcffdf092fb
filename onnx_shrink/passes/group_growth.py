"""How channel groups grow: from the output channels of a root op (a Conv, Gemm, MatMul on a
constant weight; for ``equalize`` a LayerNormalization too) through every node that touches
them, by a table of rules (``channel_groups.RULES`` for pruning, ``equalize_groups.RULES``
for scaling), until nothing new is reached or something declines the group.

``prune-channels`` removes a group's channels; ``equalize`` scales them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.compiler.options import pattern_names
from onnx_shrink.passes import half_weights
from onnx_shrink.passes.channel_groups import (
    RULES,
    SOURCE_OPS,
    Context,
    Decline,
    Edit,
    Key,
    ParamSlice,
    Relation,
    Restart,
    constant,
    who,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Group:
    """One set of channels that shrink together, or a declined candidate with its reason."""

    root: ir.Node
    channels: int
    keys: set[Key] = dataclasses.field(default_factory=set)
    params: set[ParamSlice] = dataclasses.field(default_factory=set)
    edits: set[Edit] = dataclasses.field(default_factory=set)
    sources: list[ir.Node] = dataclasses.field(default_factory=list)
    reason: str | None = None

    @property
    def weighted_nodes(self) -> set[ir.Node]:
        """Conv/Gemm/MatMul nodes whose weight this group slices (coverage)."""
        return {p.node for p in self.params if p.node.op_type in SOURCE_OPS and p.index == 1}

    @property
    def label(self) -> str:
        return self.root.name or self.root.op_type


def lifted_groups(
    model: ir.Model,
    exclude: Sequence[str],
    named: Callable[[Group], Iterable[ir.Node]],
    **how: Any,
) -> list[Group]:
    """``analyse(model, **how)`` after weights stored in half precision behind a Cast are
    made float32 constants (``half_weights``: the caller restores them) and Constant weights
    initializers; a group where a pattern of ``exclude`` names one of the ``named`` nodes
    carries the reason "excluded"."""
    half_weights.lift(model)
    graph_edit.lift_constant_weights(model)  # PicoDet's Conv weights: Constant nodes
    groups = analyse(model, **how)
    for group in groups:
        names = [node.name or "" for node in named(group)]
        if group.reason is None and any(pattern_names(p, n) for p in exclude for n in names):
            group.reason = "excluded"
    return groups


def analyse(
    model: ir.Model,
    heads: bool = True,
    rules: dict[str, Callable] | None = None,
    roots: frozenset[str] = SOURCE_OPS,
) -> list[Group]:
    """Every candidate group of the main graph, accepted (``reason is None``) or declined,
    grown from the outputs of the ``roots`` ops with a constant input 1 (a weight, or a
    norm's scale) by ``rules`` (``channel_groups.RULES`` by default)."""
    ctx = Context(model, heads)
    table = RULES if rules is None else rules
    groups: list[Group] = []
    claimed: set[ir.Value] = set()
    for node in model.graph:
        if node.op_type not in roots or node.domain not in ("", "ai.onnx"):
            continue
        if not node.outputs or node.outputs[0] is None or node.outputs[0] in claimed:
            continue
        if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
            continue  # not a producer of its own channels
        group = _grow(ctx, table, node)
        if group is None:
            continue
        claimed.update(key.value for key in group.keys)
        groups.append(group)
    _decline_overlaps(groups)
    return groups


UNKNOWN_CHANNELS = "channel count unknown, no static shape inferred for the output"


def _root_key(ctx: Context, node: ir.Node, unit: int) -> Key:
    """The channels ``node`` produces. Raises ``Decline`` where its output's shape is not
    known."""
    out = node.outputs[0]
    axis = ctx.rank(out) - 1 if node.op_type in ("MatMul", "LayerNormalization") else 1
    return Key(out, axis, 0, ctx.dim(out, axis), unit)


def _grow(ctx: Context, table: dict[str, Callable], root: ir.Node) -> Group | None:
    unit = 1
    while True:
        try:
            key = _root_key(ctx, root, unit)
        except Decline as decline:  # skl2onnx's MLP behind an ai.onnx.ml Scaler: no shapes
            # (was said as "no Conv/ConvTranspose/Gemm/MatMul with a constant weight")
            logger.info("prune-channels: %s: %s", root.name or root.op_type, decline)
            return Group(root, 0, reason=UNKNOWN_CHANNELS)
        group = Group(root, key.channels)
        try:
            _fill(ctx, table, group, key)
        except Restart as restart:
            unit *= restart.factor
            if key.length % unit:
                group.reason = "heads do not divide the producer's channels"
                return group
            continue
        except Decline as decline:
            group.reason = str(decline)
        if not group.sources and group.reason is None:  # e.g. a batched MatMul's rows
            return None
        return group


def _fill(ctx: Context, table: dict[str, Callable], group: Group, root: Key) -> None:
    queue = [root]
    group.keys.add(root)
    related: set[tuple[ir.Node, Key]] = set()
    while queue:
        key = queue.pop()
        if key.length % key.unit or key.channels != group.channels:
            raise Decline(f"{key.value.name} has {key.length} elements, not whole channels")
        for node in _touching(key.value):
            if (node, key) in related:
                continue
            related.add((node, key))
            relation = _relate(ctx, table, node, key)
            if relation.source and node not in group.sources:
                group.sources.append(node)
            group.params.update(relation.params)
            group.edits.update(relation.edits)
            for new in relation.keys:
                if new not in group.keys:
                    group.keys.add(new)
                    queue.append(new)


def _touching(value: ir.Value) -> Iterator[ir.Node]:
    if value.is_graph_output():
        raise Decline(f"{value.name} is a graph output")
    producer = value.producer()
    if producer is None:
        raise Decline(f"{value.name} is a graph input or constant")
    yield producer
    for use in value.uses():
        yield use.node


def _relate(ctx: Context, table: dict[str, Callable], node: ir.Node, key: Key) -> Relation:
    if node.graph is not ctx.graph:
        raise Decline(f"{key.value.name} is used inside a subgraph")
    rule = table.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if node.op_type == "Shape":
        raise Decline(f"{key.value.name} has a Shape consumer ({who(node)})")
    if rule is None:
        named = f" ({node.name})" if node.name else ""
        raise Decline(f"unknown op {node.op_type}{named} on the path")
    relation = rule(ctx, node, key)
    for param in relation.params:
        value = param.node.inputs[param.index]
        if value is None or not value.is_initializer():
            raise Decline(f"{who(node)}: constant input {param.index} is not an initializer")
        if value.is_graph_input() or value.is_graph_output():
            # A caller feeds or reads it at its declared shape.
            side = "input" if value.is_graph_input() else "output"
            raise Decline(f"{who(node)}: its constant {value.name} is also a graph {side}")
    return relation


def _decline_overlaps(groups: list[Group]) -> None:
    """A tensor run claimed by two accepted groups in different ways: keep the first."""
    spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for group in groups:
        if group.reason is not None:
            continue
        mine = [((id(k.value), k.axis), (k.start, k.start + k.length)) for k in group.keys]
        clash = any(lo < e and b < hi for place, (lo, hi) in mine for b, e in spans.get(place, []))
        if clash:
            group.reason = "overlaps another group's channels"
            continue
        for place, span in mine:
            spans.setdefault(place, []).append(span)
