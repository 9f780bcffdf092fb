"""Weights *stored* as int8 for layers onnxruntime computes only in float.

A weight ``W`` becomes int8 codes read through ``Cast`` to float and ``Mul`` by their
symmetric scales. onnxruntime folds those two constant nodes into a float weight when it
loads the model, so the layer computes in float as before, as fast, while the file holds a
quarter of the weight's bytes. ``recurrent`` stores GRU/RNN weights so (per gate row);
this module does it for ``ConvTranspose``, whose weight [C_in, C_out/group, k...] has no
integer kernel on onnxruntime's CPU (``quantize_static`` puts Q/DQ around it all the same, and
onnxruntime runs it in float between them).

ConvTranspose scales:

- ``group == 1``: one per output channel (axis 1), as a Conv's weight gets;
- ``group > 1``: one per input channel (axis 0). Axis 1 would share a scale between the
  groups; axis 0 keeps each scale inside one group, and in a depthwise ConvTranspose
  (``C_out/group == 1``) each is one output channel's;
- ``per_channel`` off: one for the tensor.

Tables get the same storage: a constant float32 initializer read as data by ``Slice`` or
``Reshape`` only, as a positional encoding is (``pe[:, :T]`` exports as a Slice up to the
input's length; a ViT's table is reshaped to a grid and resized to the image). Their Slice or
Reshape depends on the input, so nothing folds them, and no rule quantized them: khmersm's
sinusoidal table [1, 2048, 192] was 1.6 MB of its 3.0 MB int8 file. Scales are per entry of
the last axis (the feature), or one for the tensor.

Left float, with the reason logged: weights that are not constant float32 initializers
(ConvTranspose: of rank 3 or more), those under the pass's ``min_weight_elements``, tables
holding sentinels (non-finite, or ``|x| >= 1e20``: a mask, which one scale cannot hold with its
data), and tables other nodes also read (the float table would stay beside the codes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_shrink.passes.quant import compact, placement
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, quantize_weight
from onnx_shrink.passes.quant.table_readers import TABLE_READERS
from onnx_shrink.passes.quant.weight_matching import WeightContext, derived_name

INT8 = QUANT_TYPES["s8"]
_STORED_INPUT = {"ConvTranspose": 1, **dict.fromkeys(TABLE_READERS, 0)}
"""The input of each op ``reason`` and ``store`` take that ``store`` stores"""
STORED_OPS = tuple(_STORED_INPUT)
"""What ``reason`` and ``store`` take"""


def reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why ``node`` (of ``STORED_OPS``) cannot have its weight or table stored, or None."""
    if (why := opset_reason(context)) is not None:
        return why
    index = _STORED_INPUT[node.op_type]
    value = node.inputs[index] if len(node.inputs) > index else None
    tensor = value.const_value if value is not None else None
    # A ConvTranspose's weight of any rank from 3 on (1-D to N-D convolutions; another is
    # named as not 3), a table of any rank.
    least = 3 if index else 0
    rank = len(tensor.shape) if tensor is not None and len(tensor.shape) >= least else least
    why = context.weight_reason(value, rank=rank)
    if why is not None or node.op_type == "ConvTranspose":
        return why
    assert value is not None and tensor is not None
    return _table_reason(value, tensor.numpy())


def opset_reason(context: WeightContext) -> str | None:
    """Why the model's opset cannot hold stored weights, or None."""
    if context.opset < 7:  # Mul broadcasts the scales from opset 7 on
        return f"storing int8 weights needs opset >= 7, not {context.opset}"
    return None


def _table_reason(table: ir.Value, values: np.ndarray) -> str | None:
    """Why ``table``, a quantizable weight otherwise, cannot be stored, or None."""
    others = {u.node.op_type for u in table.uses() if u.node.op_type not in TABLE_READERS or u.idx}
    if others:
        return f"table {table.name!r} is also read by {'/'.join(sorted(others))}"
    if not np.isfinite(values).all() or np.abs(values).max() >= placement.SENTINEL_MAGNITUDE:
        return f"table {table.name!r} holds sentinel values (a mask's -inf or float32 min)"
    return None


def store(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Give ``node``, which ``reason`` passes, int8 codes of its weight or table read through
    ``Cast`` and ``Mul`` by their scales (see the module doc for the axis they follow). A
    weight several nodes of one graph read is dequantized once."""
    index = _STORED_INPUT[node.op_type]
    value = node.inputs[index]
    assert value is not None and value.const_value is not None and node.graph is not None
    axis = _scale_axis(node, len(value.const_value.shape)) if per_channel else None

    def stored(w: np.ndarray) -> dict[str, np.ndarray]:
        return _int8_codes(w, axis, narrow_storage)

    codes, scale = context.weights(value, ("int8-stored", axis), stored)
    assert codes is not None and scale is not None
    part = "W" if index else "table"
    node.replace_input_with(index, dequantized(node.graph, node, part, codes, scale))


def _scale_axis(node: ir.Node, rank: int) -> int | None:
    """The axis each scale covers one slice of (see the module doc): a ConvTranspose's output
    channels, or its input channels with groups; a table's last axis (None: a 1-D table
    gets one scale)."""
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else 0
    return rank - 1 if rank >= 2 else None


def _int8_codes(w: np.ndarray, axis: int | None, narrow_storage: bool) -> dict[str, np.ndarray]:
    """int8 codes of ``w`` and symmetric float32 scales, one per slice along ``axis`` (size 1
    on every other axis, to multiply the codes back), or one scalar for all."""
    rounding = compact.scale_rounding(narrow_storage, axis)
    q = quantize_weight(w, INT8, axis=axis, scale_rounding=rounding)
    shape = [] if axis is None else [w.shape[i] if i == axis else 1 for i in range(w.ndim)]
    return {"int8": q.values, "scale": q.scale.astype(np.float32).reshape(shape)}


def dequantized(
    graph: ir.Graph, reader: ir.Node, part: str, codes: ir.Value, scale: ir.Value
) -> ir.Value:
    """``Cast(codes) * scale``, inserted before ``reader`` (its weight ``part``), or the one
    already made in ``graph`` for an earlier reader."""
    for use in codes.uses():
        cast = use.node
        if cast.op_type == "Cast" and cast.graph is graph:
            for mul in (u.node for u in cast.outputs[0].uses()):
                if mul.op_type == "Mul" and mul.inputs[1] is scale:
                    return mul.outputs[0]
    to_float = ir.node(
        "Cast", [codes], {"to": ir.DataType.FLOAT}, name=derived_name(reader, f"{part}_int8")
    )
    rescale = ir.node(
        "Mul", [to_float.outputs[0], scale], name=derived_name(reader, f"{part}_dequant")
    )
    graph.insert_before(reader, [to_float, rescale])
    return rescale.outputs[0]
