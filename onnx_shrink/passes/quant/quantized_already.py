"""What a model holds quantized already, for the passes' "nothing quantized" warnings.

A model another tool quantized (ddddocr's CRNN: 21 ConvInteger behind DynamicQuantizeLinear)
has no float layer left to quantize; without this, the warning listed the glue the passes
skipped ("55 Mul: not between integer kernels", "4 Gather: weight is not an initializer")
and never said why nothing else was there.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

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

_INTEGER_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT16}
)


def note(graph: ir.Graph) -> str:
    """``"; the model is quantized already: 21 ConvInteger"`` (the most frequent first, in
    ``graph`` and its bodies), or "" where it holds no integer kernel and no
    DequantizeLinear of an integer weight (Q/DQ)."""
    counts: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in INTEGER_KERNELS or _dequantizes_a_weight(node):
            counts[node.op_type] += 1
    if not counts:
        return ""
    found = ", ".join(f"{count} {op}" for op, count in counts.most_common())
    return f"; the model is quantized already: {found}"


def _dequantizes_a_weight(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or not node.inputs:
        return False
    codes = node.inputs[0]
    tensor = codes.const_value if codes is not None else None
    return tensor is not None and tensor.dtype in _INTEGER_TYPES
