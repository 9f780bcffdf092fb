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
STORED_OPS = ("ConvTranspose", *TABLE_READERS)
"""What ``reason`` and ``store`` take"""


def reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why ``node`` (of ``STORED_OPS``) cannot have its weight or table stored, or None."""
    if node.op_type == "ConvTranspose":
        return conv_transpose_reason(context, node)
    return table_reason(context, node)


def store(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Store the weight or table of ``node``, which ``reason`` passes, as int8."""
    how = store_conv_transpose if node.op_type == "ConvTranspose" else store_table
    how(context, node, per_channel=per_channel, narrow_storage=narrow_storage)


def opset_reason(context: WeightContext) -> str | None:
    """Why the model's opset cannot hold stored weights, or None."""
    if context.opset < 7:  # Mul broadcasts the scales from opset 7 on
        return f"storing int8 weights needs opset >= 7, not {context.opset}"
    return None


def conv_transpose_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why the weight of ``node`` (a ConvTranspose) cannot be stored as int8, or None."""
    if (reason := opset_reason(context)) is not None:
        return reason
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = weight.const_value if weight is not None else None
    # Any rank from 3 on (1-D to N-D convolutions); another is named as not 3.
    rank = len(tensor.shape) if tensor is not None and len(tensor.shape) >= 3 else 3
    return context.weight_reason(weight, rank=rank)


def store_conv_transpose(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Give ``node``, which ``conv_transpose_reason`` passes, int8 codes of its weight read
    through ``Cast`` and ``Mul`` by their scales (see the module doc). A weight several nodes
    of one graph read is dequantized once."""
    weight = node.inputs[1]
    assert weight is not None and node.graph is not None
    axis = _conv_transpose_axis(node) if per_channel else None

    def stored(w: np.ndarray) -> dict[str, np.ndarray]:
        return int8_codes(w, axis, narrow_storage)

    codes, scale = context.weights(weight, ("int8-stored", axis), stored)
    assert codes is not None and scale is not None
    node.replace_input_with(1, dequantized(node.graph, node, "W", codes, scale))


def table_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why the table ``node`` (a Slice or Reshape ``table_readers.moves_activations`` passes)
    reads cannot
    be stored as int8, or None."""
    if (reason := opset_reason(context)) is not None:
        return reason
    data = node.inputs[0]
    assert data is not None and data.const_value is not None
    if (reason := context.weight_reason(data, rank=len(data.const_value.shape))) is not None:
        return reason
    others = sorted(
        {u.node.op_type for u in data.uses() if u.node.op_type not in TABLE_READERS or u.idx}
    )
    if others:
        return f"table {data.name!r} is also read by {'/'.join(others)}"
    values = data.const_value.numpy()
    if not np.isfinite(values).all() or np.abs(values).max() >= placement.SENTINEL_MAGNITUDE:
        return f"table {data.name!r} holds sentinel values (a mask's -inf or float32 min)"
    return None


def store_table(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Give ``node``, whose table ``table_reason`` passes, int8 codes of it read through
    ``Cast`` and ``Mul`` by their scales, per entry of its last axis. A table several nodes
    of one graph read is dequantized once."""
    data = node.inputs[0]
    assert data is not None and data.const_value is not None and node.graph is not None
    rank = len(data.const_value.shape)
    axis = rank - 1 if per_channel and rank >= 2 else None

    def stored(w: np.ndarray) -> dict[str, np.ndarray]:
        return int8_codes(w, axis, narrow_storage)

    codes, scale = context.weights(data, ("int8-stored", axis), stored)
    assert codes is not None and scale is not None
    node.replace_input_with(0, dequantized(node.graph, node, "table", codes, scale))


def _conv_transpose_axis(node: ir.Node) -> int:
    """The weight axis each scale covers one slice of (see the module doc)."""
    return 1 if node.attributes.get_int("group", 1) == 1 else 0


def int8_codes(w: np.ndarray, axis: int | None, narrow_storage: bool) -> dict[str, np.ndarray]:
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
