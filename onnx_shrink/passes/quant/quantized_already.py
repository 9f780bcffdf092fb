"""What a model holds quantized already, for the passes' "nothing quantized" warnings.

A model another tool quantized (ddddocr's CRNN: 21 ConvInteger behind DynamicQuantizeLinear)
has no float layer left to quantize; without this, the warning listed the glue the passes
skipped ("55 Mul: not between integer kernels", "4 Gather: weight is not an initializer")
and never said why nothing else was there. ``integer_weight`` recognizes a weight stored as
integers and dequantized in plain ops, for the skip reasons of ``float_reasons``,
``weight_matching``, ``prune_layers`` and ``lowrank_graph``.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.quant.numerics import QUANT_TYPES

INTEGER_KERNELS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QAttention",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)
"""Standard and com.microsoft ops that compute on integer (or packed integer) weights"""

INTEGER_WEIGHTS = frozenset(QUANT_TYPES[name].onnx for name in ("s8", "u8", "s4", "u4"))
"""Integer types a weight's codes are stored in"""

_NOTED_CODES = INTEGER_WEIGHTS | {QUANT_TYPES["s16"].onnx}
"""Codes whose DequantizeLinear ``note`` counts: 16-bit weights are quantized too"""


def note(graph: ir.Graph) -> str:
    """``"; the model is quantized already: 21 ConvInteger"`` (the most frequent first, in
    ``graph`` and its bodies), or "" where it holds no integer kernel, no DequantizeLinear
    of an integer weight (Q/DQ) and no layer on integer codes cast and scaled."""
    counts: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in INTEGER_KERNELS:
            counts[node.op_type] += 1
        elif _dequantizes_a_weight(node):
            # Only the DequantizeLinear nodes of weights are counted (a Q/DQ model has as
            # many again for its activations): said so, or "54 DequantizeLinear" reads as a
            # miscount.
            counts[f"{node.op_type} of integer weights"] += 1
        elif _reads_cast_scaled_weight(node):
            # A model int8 in Cast and Mul (all-MiniLM's 36 MatMuls): prune-channels said
            # only "no MatMul with a constant weight" where prune said "quantized already".
            counts[f"{node.op_type} on integer weights cast and scaled"] += 1
    if not counts:
        return ""
    found = ", ".join(f"{count} {what}" for what, count in counts.most_common())
    return f"; the model is quantized already: {found}"


def _reads_cast_scaled_weight(node: ir.Node) -> bool:
    index = graph_edit.WEIGHT_INPUTS.get(node.op_type)
    if index is None or len(node.inputs) <= index:
        return False
    return stored_as(node.inputs[index]) == CAST_AND_SCALED


def _dequantizes_a_weight(node: ir.Node) -> bool:
    return (
        node.op_type == "DequantizeLinear"
        and bool(node.inputs)
        and _is_integer_constant(node.inputs[0], _NOTED_CODES)
    )


def integer_weight(value: ir.Value | None) -> bool:
    """``value`` is an integer constant dequantized in the graph: ``DequantizeLinear``, or
    ``Mul`` of a constant and a ``Cast`` of one (either order), maybe behind a Transpose."""
    return stored_as(value) is not None


DEQUANTIZED = "dequantized"
CAST_AND_SCALED = "cast and scaled"


def stored_as(value: ir.Value | None) -> str | None:
    """How ``integer_weight`` found ``value`` stored: ``DEQUANTIZED`` (integer codes behind
    a DequantizeLinear) or ``CAST_AND_SCALED`` (a Cast of integer codes times a constant);
    None where it is neither."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear":
        return DEQUANTIZED if _is_integer_constant(producer.inputs[0]) else None
    if producer.op_type != "Mul":
        return None
    for cast_side, scale in ((0, 1), (1, 0)):
        cast = producer.inputs[cast_side].producer() if producer.inputs[cast_side] else None
        other = producer.inputs[scale]
        if (
            cast is not None
            and cast.op_type == "Cast"
            and _is_integer_constant(cast.inputs[0])
            and other is not None
            and other.const_value is not None
        ):
            return CAST_AND_SCALED
    return None


def _is_integer_constant(
    value: ir.Value | None, types: frozenset[ir.DataType] = INTEGER_WEIGHTS
) -> bool:
    """``value`` is a constant of one of ``types`` (8- and 4-bit integers by default)."""
    return value is not None and value.const_value is not None and value.const_value.dtype in types
