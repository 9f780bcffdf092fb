"""Clip bounds of the input's type after an opset conversion.

Before opset 11, Clip takes its bounds as float attributes; the conversion moves them to
inputs, which onnx's converter writes as float32 constants whatever the Clip reads. On a
float16 model (PP-OCR's direction classifier at opset 10, after ``fp16``) every Clip then
failed type inference ("min has inconsistent type tensor(float)"), and onnx-ir printed the
traceback of each of its three attempts. ``bound_types`` notes, before the conversion, the
type of each Clip that reads other than float32; ``retype`` casts the bounds to it after.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_shrink.compiler.walk import nodes_of, onnx_opset
from onnx_shrink.passes.quant import value_types


def bound_types(model: ir.Model) -> dict[str, ir.DataType]:
    """Per output name of a Clip with bound attributes (before opset 11) whose input is
    not float32, its input's type; {} where there is none (types inferred only where a
    Clip may read half precision)."""
    if onnx_opset(model) >= 11 or not value_types.may_hold_half(model):
        return {}
    clips = nodes_of(model, ("Clip",))
    if not clips:
        return {}
    if any(_input_type(node) is None for node in clips):
        value_types.infer_types(model)
    found = {}
    for node in clips:
        dtype = _input_type(node)
        if dtype is not None and dtype != ir.DataType.FLOAT and node.outputs[0].name:
            found[node.outputs[0].name] = dtype
    return found


def retype(model: ir.Model, types: dict[str, ir.DataType]) -> int:
    """Cast the float bounds of the Clips ``types`` names (by output) to their input's type,
    in place; how many were cast."""
    if not types:
        return 0
    cast = 0
    for node in nodes_of(model, ("Clip",)):
        dtype = types.get(node.outputs[0].name or "")
        if dtype is not None:
            cast += sum(_cast_constant(bound, dtype) for bound in node.inputs[1:])
    return cast


def _input_type(node: ir.Node) -> ir.DataType | None:
    value = node.inputs[0] if node.inputs else None
    return value.dtype if value is not None else None


def _cast_constant(value: ir.Value | None, dtype: ir.DataType) -> bool:
    """Whether ``value``, a float constant (a Constant node's output, or an initializer)
    of another type than ``dtype``, was cast to it."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.dtype == dtype or not tensor.dtype.is_floating_point():
        return False
    typed = ir.tensor(tensor.numpy().astype(dtype.numpy()), name=tensor.name)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", typed)
    else:
        value.const_value = typed
    value.dtype = dtype
    return True
