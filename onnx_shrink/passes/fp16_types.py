"""What ``fp16`` and ``fp32`` know of types: every tensor's element type by onnx's inference
(seeing past onnxruntime's contrib ops), the ONNX schemas that say which types an op takes, and
the attributes that type an op's output."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnx_shrink.passes import fp16_islands

logger = logging.getLogger("onnx_shrink.passes.fp16")


def tensor_dtypes(model: ir.Model) -> dict[ir.Value, ir.DataType]:
    """Element types of tensor values (main graph, bodies) by non-strict onnx inference.

    Read from the inferred model: onnx_ir's ShapeInferencePass merges sequences as tensors.
    """
    infer = functools.partial(
        onnx.shape_inference.infer_shapes, check_type=False, strict_mode=False, data_prop=False
    )
    clone = model.clone()
    _type_contrib_outputs(clone)
    _type_fixed_outputs(clone)
    try:
        inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, clone))
    except Exception as e:  # onnx raises several types; the declared types remain
        logger.warning("fp16: onnx type inference failed (%s); using declared types", e)
        inferred = model
    dtypes: dict[ir.Value, ir.DataType] = {}
    for original, twin_graph in zip(model.graphs(), inferred.graphs(), strict=True):
        named = {v.name: v for v in (*twin_graph.inputs, *twin_graph.initializers.values())}
        pairs = [
            (v, named.get(v.name, v)) for v in (*original.inputs, *original.initializers.values())
        ]
        for node, twin in zip(original, twin_graph, strict=True):
            pairs += zip(node.outputs, twin.outputs, strict=True)
        for value, twin in pairs:
            known = twin.type if twin.type is not None else value.type
            if isinstance(known, ir.TensorType):
                dtypes[value] = known.dtype
            elif known is None and value.const_value is not None:
                dtypes[value] = value.const_value.dtype
    return dtypes


# com.microsoft ops onnx's inference does not know (what quant, quant-dynamic and quant-weight
# write), by the input whose element type their output has: a scale, an initializer whose type
# is known before inference. Typed, they no longer stop inference of every node after them.
_CONTRIB_OUTPUT_TYPE_FROM = {
    "MatMulNBits": 2,
    "GatherBlockQuantized": 2,
    "DynamicQuantizeMatMul": 2,
    "MatMulIntegerToFloat": 2,
}


def _type_contrib_outputs(model: ir.Model) -> None:
    """Give the outputs of ``_CONTRIB_OUTPUT_TYPE_FROM``'s ops their type, in place."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        index = _CONTRIB_OUTPUT_TYPE_FROM.get(node.op_type)
        if node.domain != "com.microsoft" or index is None or index >= len(node.inputs):
            continue
        source, out = node.inputs[index], node.outputs[0]
        if source is None or out.type is not None:
            continue
        dtype = source.dtype or (source.const_value.dtype if source.const_value else None)
        if dtype is not None:
            out.type = ir.TensorType(dtype)


def _type_fixed_outputs(model: ir.Model) -> None:
    """Give untyped outputs whose schema fixes their type (``tensor(float)``, not a type
    variable) that type, in place. onnx's inference types no output of some ai.onnx.ml ops
    (Scaler): once ``fold`` drops the Cast that followed one (float to float, an identity),
    nothing after it had a type, and fp16 kept every node float32 (sklearn's MLPs)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if all(out.type is not None for out in node.outputs):
            continue
        found = node_schema(model, node)
        if found is None:
            continue
        for index, out in enumerate(node.outputs):
            fixed = formal(found.outputs, index)
            if out.type is None and fixed in _FIXED_TYPES:
                out.type = ir.TensorType(_FIXED_TYPES[fixed])


_FIXED_TYPES = {
    "tensor(float)": ir.DataType.FLOAT,
    "tensor(double)": ir.DataType.DOUBLE,
    "tensor(int64)": ir.DataType.INT64,
    "tensor(int32)": ir.DataType.INT32,
    "tensor(bool)": ir.DataType.BOOL,
}


def node_schema(model: ir.Model, node: ir.Node) -> onnx.defs.OpSchema | None:
    """``node``'s schema at the model's opset of its domain ("ai.onnx" read as ""), if any."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = model.opset_imports.get(domain, model.opset_imports.get("ai.onnx"))
    return schema(node.op_type, domain, version) if version is not None else None


@functools.cache
def schema(op_type: str, domain: str, version: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=version, domain=domain)
    except onnx.defs.SchemaError:
        return None


def formal(params: list[onnx.defs.OpSchema.FormalParameter], index: int) -> str | None:
    if index < len(params):
        return params[index].type_str
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return params[-1].type_str if params and params[-1].option == variadic else None


# Ops whose float output type is their ``dtype`` attribute.
DTYPE_ATTRIBUTE_OPS = frozenset(
    {
        "EyeLike",
        "Bernoulli",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
    }
)


def retype(new: dict[ir.Value, ir.DataType], orig: dict[ir.Value, ir.DataType]) -> list[ir.Value]:
    """Give each value whose type a conversion changed (``new`` against ``orig``) its new type,
    where it carries one or is a graph input or output; returns those values."""
    changed = [v for v, t in new.items() if t != orig.get(v)]
    for value in changed:
        if value.type is not None or value.is_graph_input() or value.is_graph_output():
            value.type = ir.TensorType(new[value])
    return changed


def converted(tensor: ir.TensorProtocol, dtype: ir.DataType) -> ir.Tensor:
    """``tensor`` in ``dtype`` (rounded to nearest even where ``dtype`` is narrower)."""
    array = tensor.numpy().astype(dtype.numpy())
    return ir.Tensor(array, dtype=dtype, name=tensor.name)


def retype_attributes(node: ir.Node, source: frozenset[ir.DataType], target: ir.DataType) -> None:
    """Rewrite the attribute that makes ``node`` (standard domain) produce a type of
    ``source`` to produce ``target``: ``Cast.to``, a Constant's or ConstantOfShape's value (one
    without a value makes float32 zeros), the ``dtype`` of ``DTYPE_ATTRIBUTE_OPS`` (float32
    when RandomNormal/RandomUniform give none)."""
    attrs = node.attributes
    if node.domain not in ("", "ai.onnx"):
        return
    if node.op_type == "Cast" and attrs.get_int("to") in source:
        attrs["to"] = ir.AttrInt64("to", target)
    elif node.op_type in ("Constant", "ConstantOfShape"):
        tensor = fp16_islands.constant_tensor(node)
        if tensor is None and node.op_type == "ConstantOfShape":
            tensor = ir.tensor(np.zeros(1, dtype=np.float32))
        if tensor is None or tensor.dtype not in source:
            return
        for name in ("value", "value_float", "value_floats"):
            attrs.pop(name, None)
        attrs["value"] = ir.AttrTensor("value", converted(tensor, target))
    elif node.op_type in DTYPE_ATTRIBUTE_OPS:
        default = ir.DataType.FLOAT if node.op_type in ("RandomNormal", "RandomUniform") else None
        if attrs.get_int("dtype", default) in source:
            attrs["dtype"] = ir.AttrInt64("dtype", target)
