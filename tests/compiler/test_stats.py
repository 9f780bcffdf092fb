"""Accounting: nodes, params, bytes and MACs, including subgraphs and functions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from onnx_shrink.compiler import io, stats
from tests.helpers import parse


def _weights_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        onh.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w", (4, 3, 3, 3)), ("wm", (16, 32)), ("wg", (8, 16)))
    ]
    f = onnx.TensorProto.FLOAT
    graph = oh.make_graph(
        [
            oh.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("MatMul", ["x", "wm"], ["m"]),
            oh.make_node("Gemm", ["x", "wg"], ["gm"], transB=1),
        ],
        "g",
        [
            oh.make_tensor_value_info("img", f, ["N", 3, 8, 8]),
            oh.make_tensor_value_info("x", f, ["N", 16]),
        ],
        [
            oh.make_tensor_value_info("c", f, ["N", 4, 8, 8]),
            oh.make_tensor_value_info("m", f, ["N", 32]),
            oh.make_tensor_value_info("gm", f, ["N", 8]),
        ],
        initializer=inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_macs_of_matmul_gemm_and_conv_follow_their_formulas():
    model = io.load(_weights_model())
    s = stats.measure(model)
    conv = 4 * 8 * 8 * (3 * 3 * 3)  # output elements x (Cin x kh x kw)
    matmul = 32 * 16  # output elements x K
    gemm = 8 * 16
    assert s.macs == conv + matmul + gemm
    assert s.nodes_without_macs == 0
    assert s.params == 4 * 3 * 3 * 3 + 16 * 32 + 8 * 16
    assert s.tensor_bytes == s.params * 4


def test_counts_include_if_branches():
    model = io.load(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
      y = If (c) <
        then_branch = t () => (float[2] a) { a = Relu(x) },
        else_branch = e () => (float[2] b) {
          k = Constant <value = float[2] {1, 2}> ()
          b = Add(x, k)
        }
      >
    }
    """)
    )
    s = stats.measure(model)
    assert s.nodes == 4
    assert s.op_types == {"If": 1, "Relu": 1, "Constant": 1, "Add": 1}
    assert s.params == 2
