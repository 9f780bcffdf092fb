"""Weights stored in half precision behind a Cast to float32 ("fp16 weights, fp32 maths": a
MobileNetV4 embedder with 93 such Casts, the float islands ``fp16`` leaves), quantized,
pruned and converted like float32 ones.

``fold`` keeps such a Cast: computing it would double the weight's bytes. The quant and
prune passes need the weight as a constant, so ``lift`` replaces each Cast of a
float16/bfloat16 initializer that is read only as a weight (exactly: half precision widens to
float32 without rounding) by the float32 initializer it computes, and ``restore`` puts back
the half-precision storage and its Cast for every one still a float32 weight after the pass:
a layer the pass excludes costs no more bytes than before, and a pruned one keeps its zeros
(values a pass rewrote, a refit's, round to the half type they came in). One the pass
stored in another type (``fp16``: float16 itself) stays as the pass left it. Main graph only,
where the statistics engine measures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.quant.value_types import HALF_TYPES

logger = logging.getLogger(__name__)

WEIGHT_SLOTS = {
    op: (index, 2) if op in ("Conv", "ConvTranspose", "Gemm") else (index,)
    for op, index in graph_edit.WEIGHT_INPUTS.items()
}
"""The inputs quant passes read as constants: weights (tables), and biases"""
_MARK = "onnx_shrink.half_weight"
"""``Value.meta`` key of a lifted weight: its half-precision initializer's name, its Cast's
name, and the half type's numpy dtype"""


def lift(model: ir.Model) -> int:
    """Replace each Cast to float32 of a half-precision initializer whose every reader reads
    it as a weight (``WEIGHT_SLOTS``) by the float32 initializer; returns how many."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if not _lifts(node):
            continue
        source, out = node.inputs[0], node.outputs[0]
        assert source is not None and source.const_value is not None
        half = source.const_value.numpy()
        lifted = graph_edit.add_initializer(graph, out.name, half.astype(np.float32))
        lifted.meta[_MARK] = (source.name, node.name, half.dtype)
        ir.convenience.replace_all_uses_with(out, lifted)
        graph.remove(node, safe=True)
        if not source.uses() and source.name in graph.initializers:
            graph.initializers.pop(source.name)
        count += 1
    return count


@contextlib.contextmanager
def lifted(model: ir.Model) -> Iterator[None]:
    """``lift`` on entry, ``restore`` on exit, also when the body raises: a pass never leaves
    float32 copies of half weights behind."""
    lift(model)
    try:
        yield
    finally:
        restore(model)


def restore(model: ir.Model) -> int:
    """Put each weight ``lift`` made float32 that is still read as such back in half
    precision (its current values: exact where the pass left them) behind a Cast of the
    old name, before its first reader; returns how many."""
    graph = model.graph
    lifted_ones = [v for v in graph.initializers.values() if _MARK in v.meta]
    if not lifted_ones:
        return 0
    taken = graph_edit.value_names(graph)
    node_names = {node.name for node in graph if node.name}
    position = {node: i for i, node in enumerate(graph)}
    count = 0
    for lifted in lifted_ones:
        name, cast_name, dtype = lifted.meta.pop(_MARK)
        if lifted.dtype != ir.DataType.FLOAT:  # the pass stored it in a type of its own (fp16)
            continue
        assert lifted.const_value is not None
        current = lifted.const_value.numpy()
        with np.errstate(over="ignore"):
            values = current.astype(dtype)
        if not np.isfinite(values[np.isfinite(current)]).all():
            # A refit's values past the half type's range would be written as inf.
            logger.info("%s stays float32: its values overflow %s", lifted.name, dtype)
            continue
        graph.initializers.pop(lifted.name)
        if not lifted.uses():
            continue
        half = graph_edit.add_initializer(graph, graph_edit.fresh_name(name, taken), values)
        if cast_name:  # a weight prune-channels copied gets a Cast of its own
            cast_name = graph_edit.fresh_name(cast_name, node_names)
        cast = ir.node("Cast", [half], {"to": int(ir.DataType.FLOAT)}, name=cast_name)
        first = min((use.node for use in lifted.uses()), key=position.__getitem__)
        ir.convenience.replace_all_uses_with(lifted, cast.outputs[0])
        cast.outputs[0].name = lifted.name
        cast.outputs[0].type, cast.outputs[0].shape = lifted.type, lifted.shape
        graph.insert_before(first, cast)
        count += 1
    return count


def mark_like(value: ir.Value, lifted: ir.Value) -> None:
    """Have ``restore`` treat ``value`` (a pass's copy of the lifted ``lifted``: prune-channels
    gives a reader that cuts it otherwise its own) as lifted from the same half weight."""
    if _MARK in lifted.meta:
        value.meta[_MARK] = lifted.meta[_MARK]


def _lifts(node: ir.Node) -> bool:
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
        return False
    if node.attributes.get_int("to") != ir.DataType.FLOAT:
        return False
    source, out = node.inputs[0], node.outputs[0]
    if source is None or source.const_value is None or source.dtype not in HALF_TYPES:
        return False
    if not source.is_initializer() or source.is_graph_input() or out.is_graph_output():
        return False
    uses = list(out.uses())
    return bool(uses) and all(
        use.node.domain in ("", "ai.onnx")
        and use.idx in WEIGHT_SLOTS.get(use.node.op_type, ())
        and use.node.graph is node.graph
        for use in uses
    )
