"""Deterministic synthetic ONNX models for exercising the compiler.

Contract:
    * Every builder takes a ``seed`` (plus, for the transformer, its sizes) and returns a
      fresh ``onnx.ModelProto`` that passes ``onnx.checker.check_model(full_check=True)``.
    * Models use the default ONNX domain at opset 17 and IR version 8, so any
      onnxruntime >= 1.14 loads them.
    * Weights come only from ``np.random.default_rng(seed)``: the same arguments give
      byte-identical serialized models; a different seed gives different weights.
    * The leading input dimension is symbolic and named ``"batch"`` (the transformer's
      second dimension is ``"seq"``); all outputs are float32.
    * Weights use He/Xavier scaling, so outputs on unit-scale inputs are finite and
      not saturated.

No torch: only ``onnx.helper`` and numpy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
FLOAT = TensorProto.FLOAT


class _GraphBuilder:
    """Accumulates nodes and initializers; hands out unique value names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        output: str | None = None,
        **attrs: object,
    ) -> str:
        out = output or self.fresh(hint or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self.fresh(f"n_{op_type}"), **attrs)
        )
        return out

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def xavier(self, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-limit, limit, shape).astype(np.float32)

    def bias(self, size: int, scale: float = 0.01) -> np.ndarray:
        return (self.rng.standard_normal(size) * scale).astype(np.float32)

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="onnx-shrink-models",
            ir_version=IR_VERSION,
        )
        onnx.checker.check_model(model, full_check=True)
        logger.debug("built %s: %d nodes, %d initializers", name, len(self.nodes), len(self.inits))
        return model

    # ---- composite layers -------------------------------------------------------------

    def conv_bn(
        self, x: str, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, relu: bool = True
    ) -> str:
        """Conv (no bias) -> BatchNormalization (inference) -> optional Relu."""
        pad = kernel // 2
        w = self.const("conv_w", self.he((c_out, c_in, kernel, kernel), c_in * kernel * kernel))
        y = self.op(
            "Conv", [x, w], kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride, stride]
        )
        scale = self.const("bn_scale", self.rng.uniform(0.8, 1.2, c_out).astype(np.float32))
        shift = self.const("bn_bias", self.bias(c_out, 0.05))
        mean = self.const("bn_mean", self.bias(c_out, 0.1))
        var = self.const("bn_var", self.rng.uniform(0.5, 1.5, c_out).astype(np.float32))
        y = self.op("BatchNormalization", [y, scale, shift, mean, var], epsilon=1e-5)
        return self.op("Relu", [y]) if relu else y

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        """MatMul with a [d_in, d_out] weight followed by Add of a bias."""
        w = self.const("w", self.xavier((d_in, d_out), d_in, d_out))
        b = self.const("b", self.bias(d_out))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, d: int, output: str | None = None) -> str:
        gamma = self.const("ln_gamma", self.rng.uniform(0.9, 1.1, d).astype(np.float32))
        beta = self.const("ln_beta", self.bias(d))
        return self.op("LayerNormalization", [x, gamma, beta], output=output, axis=-1, epsilon=1e-5)


def _float_input(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, dims)


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    """x [batch, 64] -> Gemm+Relu -> MatMul+Add+Relu -> Gemm -> logits [batch, 10]."""
    g = _GraphBuilder(seed)
    w1 = g.const("fc1_w", g.he((128, 64), 64))  # Gemm transB=1 layout [out, in]
    h = g.op("Gemm", ["x", w1, g.const("fc1_b", g.bias(128))], transB=1)
    h = g.op("Relu", [h])
    h = g.op("Relu", [g.linear(h, 128, 64)])
    w3 = g.const("fc3_w", g.xavier((64, 10), 64, 10))
    g.op("Gemm", [h, w3, g.const("fc3_b", g.bias(10))], output="logits")
    return g.model(
        "mlp",
        [_float_input("x", ["batch", 64])],
        [_float_input("logits", ["batch", 10])],
    )


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    """image [batch, 3, 32, 32] -> stem, residual block, pooling, head -> logits [batch, 10]."""
    g = _GraphBuilder(seed)
    stem = g.conv_bn("image", 3, 16)
    # Residual block: Conv-BN-Relu-Conv-BN, Add skip, Relu.
    r = g.conv_bn(stem, 16, 16)
    r = g.conv_bn(r, 16, 16, relu=False)
    y = g.op("Relu", [g.op("Add", [r, stem])])
    y = g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # 16x16
    y = g.conv_bn(y, 16, 32, stride=2)  # strided conv -> 8x8
    y = g.op("GlobalAveragePool", [y])
    y = g.op("Flatten", [y], axis=1)
    w = g.const("fc_w", g.xavier((10, 32), 32, 10))
    g.op("Gemm", [y, w, g.const("fc_b", g.bias(10))], output="logits", transB=1)
    return g.model(
        "cnn",
        [_float_input("image", ["batch", 3, 32, 32])],
        [_float_input("logits", ["batch", 10])],
    )


def _self_attention(g: _GraphBuilder, x: str, d_model: int, heads: int) -> str:
    """Multi-head self-attention on x [batch, seq, d_model]; returns the projected output."""
    head_dim = d_model // heads
    split = g.const("split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = g.const("merge_shape", np.array([0, 0, d_model], dtype=np.int64))

    def to_heads(t: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm)

    q = to_heads(g.linear(x, d_model, d_model), [0, 2, 1, 3])  # [b, h, s, d]
    k = to_heads(g.linear(x, d_model, d_model), [0, 2, 3, 1])  # [b, h, d, s]
    v = to_heads(g.linear(x, d_model, d_model), [0, 2, 1, 3])  # [b, h, s, d]
    scores = g.op("MatMul", [q, k])
    scale = g.const("attn_scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    scores = g.op("Div", [scores, scale])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, v])  # [b, h, s, d]
    ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, merge])
    return g.linear(ctx, d_model, d_model)


def _gelu_erf(g: _GraphBuilder, x: str) -> str:
    """GELU as 0.5 * x * (1 + Erf(x / sqrt(2)))."""
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    one = g.const("one", np.array(1.0, dtype=np.float32))
    half = g.const("half", np.array(0.5, dtype=np.float32))
    e = g.op("Erf", [g.op("Div", [x, sqrt2])])
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, one])]), half])


def _encoder_block(g: _GraphBuilder, x: str, d_model: int, heads: int, d_ff: int, output=None):
    """Post-LN encoder block on x [batch, seq, d_model]."""
    attn = _self_attention(g, x, d_model, heads)
    h = g.layer_norm(g.op("Add", [x, attn]), d_model)
    ff = g.linear(_gelu_erf(g, g.linear(h, d_model, d_ff)), d_ff, d_model)
    return g.layer_norm(g.op("Add", [h, ff]), d_model, output=output)


def build_transformer_block(
    seed: int = 0, d_model: int = 64, heads: int = 4, d_ff: int = 128
) -> onnx.ModelProto:
    """Post-LN encoder block: hidden [batch, seq, d_model] -> output [batch, seq, d_model]."""
    return build_transformer_encoder(seed, layers=1, d_model=d_model, heads=heads, d_ff=d_ff)


def build_transformer_encoder(
    seed: int = 0, layers: int = 2, d_model: int = 64, heads: int = 4, d_ff: int = 128
) -> onnx.ModelProto:
    """``layers`` post-LN encoder blocks: hidden [batch, seq, d_model] -> output (same shape).

    At layers=12, d_model=1024, d_ff=4096 the weights take 0.6 GB: the size at which
    onnxruntime's quantizer spends most of its time in per-channel weight loops.
    """
    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
    if layers < 1:
        raise ValueError(f"layers={layers} must be at least 1")
    g = _GraphBuilder(seed)
    x = "hidden"
    for index in range(layers):
        x = _encoder_block(
            g, x, d_model, heads, d_ff, output="output" if index == layers - 1 else None
        )
    name = "transformer_block" if layers == 1 else "transformer_encoder"
    return g.model(
        name,
        [_float_input("hidden", ["batch", "seq", d_model])],
        [_float_input("output", ["batch", "seq", d_model])],
    )


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "transformer": build_transformer_block,
}
