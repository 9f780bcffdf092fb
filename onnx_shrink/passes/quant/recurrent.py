"""LSTM weights as int8 for onnxruntime's ``com.microsoft.DynamicQuantizeLSTM`` (``quant-dynamic``).

``LSTM(X, W, R, B, sequence_lens, initial_h, initial_c, P)`` with constant float32 ``W``
[D, 4H, I] and ``R`` [D, 4H, H] becomes ``DynamicQuantizeLSTM`` on the same inputs and
attributes, with int8 codes stored transposed ([D, I, 4H] and [D, H, 4H]: the kernel's
layout) and symmetric scales per gate row ([D, 4H]) or per direction ([D]), and zero points 0
(one initializer for W's and R's, which the kernel requires though they are all 0).
Each step the kernel quantizes ``X_t`` and ``H_{t-1}`` to u8 at run time, as
``DynamicQuantizeMatMul`` does an activation.

Left float, with the reason logged: ``layout=1`` (batch first: the contrib op has no such
attribute; onnxruntime's own quantizer drops it, and its CPU LSTM refuses the layout anyway),
weights that are not constant float32 [D, 4H, *] initializers, and nodes whose two weights
hold fewer than ``min_weight_elements`` elements together. GRU and RNN have no integer kernel
in onnxruntime: they stay float (``FLOAT_ONLY``, ``log_float_only``).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.passes.quant import compact
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, quantize_weight
from onnx_shrink.passes.quant.weight_matching import MS_DOMAIN, WeightContext, derived_name

logger = logging.getLogger(__name__)

INT8 = QUANT_TYPES["s8"]
FLOAT_ONLY = ("GRU", "RNN")  # no integer kernel in onnxruntime


def lstm_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot become ``DynamicQuantizeLSTM``, or None."""
    if node.attributes.get_int("layout", 0) != 0:
        return "layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    weights = node.inputs[1:3]
    for value in weights:
        reason = context.weight_reason(value, rank=3, min_elements=0)
        if reason is not None:
            return reason
    hidden = node.attributes.get_int("hidden_size", 0)
    w, r = (value.const_value for value in weights)  # type: ignore[union-attr]
    if hidden <= 0 or w.shape[1] != 4 * hidden or tuple(r.shape[1:]) != (4 * hidden, hidden):
        return f"weights {tuple(w.shape)} and {tuple(r.shape)} do not match hidden_size {hidden}"
    if w.size + r.size < context.min_elements:
        return f"W and R hold {w.size + r.size} < {context.min_elements} elements"
    return None


def quantize_lstm(
    context: WeightContext, node: ir.Node, *, per_channel: bool, narrow_storage: bool
) -> bool:
    """Replace LSTM ``node``, which ``lstm_reason`` passes, by ``DynamicQuantizeLSTM``."""
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
    return True


def _int8_gates(w: np.ndarray, per_channel: bool, narrow_storage: bool) -> dict[str, np.ndarray]:
    """int8 codes of ``w`` [D, G, K] transposed to [D, K, G] and symmetric scales per gate
    row [D, G] (or per direction [D]); their zero points are 0 (``zero_point``)."""
    directions, rows, columns = w.shape
    # One slice per row (or per direction) along axis 0 of a 2-D view.
    flat = w.reshape(directions * rows, columns) if per_channel else w.reshape(directions, -1)
    rounding = compact.scale_rounding(narrow_storage, 0)
    q = quantize_weight(flat, INT8, axis=0, scale_rounding=rounding)
    shape = (directions, rows) if per_channel else (directions,)
    codes = q.values.reshape(directions, rows, columns).transpose(0, 2, 1)
    scale = q.scale.astype(np.float32).reshape(shape)
    return {"int8": np.ascontiguousarray(codes), "scale": scale}


FLOAT_ONLY_WARN_SHARE = 0.1
"""The share of a model's float weight bytes in float-only recurrent nodes from which their
staying float is a warning (NSNet2's two GRUs: 72 %, and int8 shrank the file by 21 %)."""


def log_float_only(pass_name: str, model: ir.Model, nodes: list[ir.Node]) -> None:
    """Say which recurrent nodes stay float because onnxruntime has no integer kernel: a
    warning where their weights are ``FLOAT_ONLY_WARN_SHARE`` of the model's or more (the
    file shrinks far less than int8 suggests), else an info line."""
    counts = collections.Counter(node.op_type for node in nodes)
    if not counts:
        return
    kinds = ", ".join(f"{count} {op}" for op, count in sorted(counts.items()))
    share = _float_weight_share(model, nodes)
    if share >= FLOAT_ONLY_WARN_SHARE:
        logger.warning(
            "%s: %s stay float, holding %.0f%% of the model's float weights: onnxruntime has "
            "no integer kernel for them (fp16 halves them)",
            pass_name,
            kinds,
            100 * share,
        )
    else:
        logger.info(
            "%s: %s stay float: onnxruntime has no integer kernel for them", pass_name, kinds
        )


def _float_weight_share(model: ir.Model, nodes: list[ir.Node]) -> float:
    """The share of the model's float constant bytes (initializers and Constant nodes, every
    graph) that ``nodes`` read: the float weights as the pass found them, before it drops
    those it quantized."""
    floats: dict[str, int] = {}
    for value, tensor in walk.initializer_tensors(model):
        if tensor.dtype.is_floating_point():
            floats[value.name or ""] = tensor.nbytes
    for node, tensor in walk.constant_node_tensors(model):
        if tensor.dtype.is_floating_point():
            floats[node.outputs[0].name or ""] = tensor.nbytes
    read = {v.name for node in nodes for v in node.inputs if v is not None and v.name in floats}
    total = sum(floats.values())
    return sum(floats[name] for name in read) / total if total else 0.0
