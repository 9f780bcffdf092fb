"""Recurrent layers' weights as int8 (``quant-dynamic``'s rule 9, ``quant``'s rule 10).

``LSTM(X, W, R, B, sequence_lens, initial_h, initial_c, P)`` with constant float32 ``W``
[D, 4H, I] and ``R`` [D, 4H, H] becomes ``DynamicQuantizeLSTM`` on the same inputs and
attributes, with int8 codes stored transposed ([D, I, 4H] and [D, H, 4H]: the kernel's
layout) and symmetric scales per gate row ([D, 4H]) or per direction ([D]), and zero points 0
(one initializer for W's and R's, which the kernel requires though they are all 0).
Each step the kernel quantizes ``X_t`` and ``H_{t-1}`` to u8 at run time, as
``DynamicQuantizeMatMul`` does an activation.

GRU and RNN have no integer kernel in onnxruntime, and neither has an LSTM the contrib op
cannot take (``layout=1``: batch first, which it has no attribute for; onnxruntime's own
quantizer drops it, and its CPU LSTM refuses the layout anyway) or one in standard ONNX only
(``fused=False``). Their ``W`` and ``R`` are *stored* as int8 instead (``store_int8``): codes
[D, G, K] with the same scales per gate row, read through ``Cast`` to float and ``Mul`` by the
scales. onnxruntime folds those two nodes into float weights when it loads the model, so the
layer computes in float as before, as fast, while the file holds a quarter of its weight
bytes (NSNet2's two GRUs hold 71 % of its weights; ``quantize_dynamic`` and
``quantize_static`` leave them float).

Left float, with the reason logged: weights that are not constant float32 [D, G, *]
initializers, and nodes whose two weights hold fewer than ``min_weight_elements`` elements
together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_shrink.passes.quant import compact, stored_int8
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, quantize_weight
from onnx_shrink.passes.quant.weight_matching import MS_DOMAIN, WeightContext, derived_name

INT8 = QUANT_TYPES["s8"]
RECURRENT = ("LSTM", "GRU", "RNN")


def _lstm_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot become ``DynamicQuantizeLSTM``, or None."""
    if node.attributes.get_int("layout", 0) != 0:
        return "layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    reason = _weights_reason(context, node)
    if reason is not None:
        return reason
    hidden = node.attributes.get_int("hidden_size", 0)
    w, r = (value.const_value for value in node.inputs[1:3])  # type: ignore[union-attr]
    if hidden <= 0 or w.shape[1] != 4 * hidden or tuple(r.shape[1:]) != (4 * hidden, hidden):
        return f"weights {tuple(w.shape)} and {tuple(r.shape)} do not match hidden_size {hidden}"
    return None


def _weights_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why W and R of ``node`` (recurrent) are not constant float32 [D, G, *] initializers
    with the same gate rows, holding the pass's minimum of elements together, or None."""
    weights = node.inputs[1:3]
    for value in weights:
        reason = context.weight_reason(value, rank=3, min_elements=0)
        if reason is not None:
            return reason
    w, r = (value.const_value for value in weights)  # type: ignore[union-attr]
    if w.shape[:2] != r.shape[:2]:
        return f"weights {tuple(w.shape)} and {tuple(r.shape)} have different gate rows"
    if w.size + r.size < context.min_elements:
        return f"W and R hold {w.size + r.size} < {context.min_elements} elements"
    return None


def quantize_lstm(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Replace LSTM ``node``, which ``_lstm_reason`` passes, by ``DynamicQuantizeLSTM``."""
    codes, scales = [], []
    for value in node.inputs[1:3]:
        assert value is not None
        key = ("int8-lstm", per_channel)
        quantized = context.weights(
            value, key, lambda w: _int8_gates(w, per_channel, narrow_storage)
        )
        codes.append(quantized[0])
        scales.append(quantized[1])
    assert node.graph is not None and scales[0] is not None and scales[0].shape is not None
    zero = context.zero_point(node.graph, np.int8, tuple(scales[0].shape.numpy()))
    optional = list(node.inputs[3:8]) + [None] * (8 - len(node.inputs))
    inputs = [node.inputs[0], *codes, *optional, scales[0], zero, scales[1], zero]
    attributes = {name: attr for name, attr in node.attributes.items() if name != "layout"}
    replacement = ir.node(
        "DynamicQuantizeLSTM",
        inputs,
        attributes,
        domain=MS_DOMAIN,
        num_outputs=len(node.outputs),
        name=derived_name(node, "quant"),
    )
    context.replace([node], [replacement])


def _int8_gates(w: np.ndarray, per_channel: bool, narrow_storage: bool) -> dict[str, np.ndarray]:
    """int8 codes of ``w`` [D, G, K] transposed to [D, K, G] and symmetric scales per gate
    row [D, G] (or per direction [D]); their zero points are 0 (``zero_point``)."""
    codes, scale = _int8_rows(w, per_channel, narrow_storage)
    shape = scale.shape[:2] if per_channel else scale.shape[:1]
    transposed = np.ascontiguousarray(codes.transpose(0, 2, 1))
    return {"int8": transposed, "scale": scale.reshape(shape)}


def _int8_rows(
    w: np.ndarray, per_channel: bool, narrow_storage: bool
) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of ``w`` [D, G, K] and symmetric float32 scales [D, G, 1] per gate row (or
    [D, 1, 1] per direction), shaped to multiply the codes back."""
    directions, rows, columns = w.shape
    # One slice per row (or per direction) along axis 0 of a 2-D view.
    flat = w.reshape(directions * rows, columns) if per_channel else w.reshape(directions, -1)
    rounding = compact.scale_rounding(narrow_storage, 0)
    q = quantize_weight(flat, INT8, axis=0, scale_rounding=rounding)
    scale = q.scale.astype(np.float32).reshape(directions, rows if per_channel else 1, 1)
    return q.values.reshape(w.shape), scale


def rewrite_for(
    context: WeightContext, node: ir.Node, fused: bool
) -> tuple[Callable[..., None], str | None]:
    """How rule 9 rewrites ``node`` (recurrent), and why it cannot (None: it can):
    ``quantize_lstm`` for an LSTM ``DynamicQuantizeLSTM`` takes (``fused``), else
    ``store_int8``."""
    if node.op_type == "LSTM" and fused and _lstm_reason(context, node) is None:
        return quantize_lstm, None
    return store_int8, _stored_reason(context, node)


def _stored_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why the weights of ``node`` (an LSTM, GRU or RNN) cannot be stored as int8, or None."""
    return stored_int8.opset_reason(context) or _weights_reason(context, node)


def store_int8(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> None:
    """Give ``node``, which ``_stored_reason`` passes, int8 codes of its W and R read through
    ``Cast`` and ``Mul`` by their scales (see the module doc). A weight several nodes of one
    graph read is dequantized once."""
    graph = node.graph
    assert graph is not None

    def stored(w: np.ndarray) -> dict[str, np.ndarray]:
        codes, scale = _int8_rows(w, per_channel, narrow_storage)
        return {"int8": codes, "scale": scale}

    for index, part in ((1, "W"), (2, "R")):
        value = node.inputs[index]
        assert value is not None
        codes, scale = context.weights(value, ("int8-stored", per_channel), stored)
        assert codes is not None and scale is not None
        node.replace_input_with(index, stored_int8.dequantized(graph, node, part, codes, scale))
