"""The bytes of a quantized model: generated names, omitted zero points."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import compact
from tests.helpers import make_model
from tests.passes.quant.test_static_placement import _conv_relu_pool, _optimized_ops, _quantize

RNG = np.random.default_rng(0)
F = onnx.TensorProto.FLOAT


def _identity_chain(names: list[str]) -> onnx.ModelProto:
    """x -> Identity -> names[0] -> Identity -> names[1] ... -> y."""
    nodes, previous = [], "x"
    for name in [*names, "y"]:
        nodes.append(oh.make_node("Identity", [previous], [name]))
        previous = name
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, [2])],
        [oh.make_tensor_value_info("y", F, [2])],
        {},
    )


def test_an_alias_is_the_shortest_unambiguous_trailing_part_of_a_name():
    names = compact.Names(
        io.load(
            _identity_chain(
                [
                    "/m/layer.0/query/MatMul_output_0",
                    "/m/layer.1/query/MatMul_output_0",
                    "/m/layer.0/key/MatMul_output_0",
                    "conv2d_3.tmp_0",
                ]
            )
        ).graph
    )
    assert names.alias("/m/layer.0/query/MatMul_output_0") == "layer.0/query/MatMul"
    assert names.alias("/m/layer.0/key/MatMul_output_0") == "key/MatMul"
    assert names.alias("conv2d_3.tmp_0") == "conv2d_3.tmp_0"
    assert names.fresh("x") == "x_1" and names.fresh("x") == "x_2" and names.fresh("z") == "z"


def test_quantized_tensors_get_short_names_and_their_quantize_node_says_which(tmp_path):
    feeds = {"x": RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    _, model = _quantize(_conv_relu_pool(), feeds, tmp_path)
    quantize = {n.inputs[0].name: n for n in model.graph if n.op_type == "QuantizeLinear"}
    assert quantize["x"].name == "x" and quantize["r"].name == "r"
    for node in quantize.values():
        scale, zero = node.inputs[1].name, node.inputs[2].name
        prefix = scale.removesuffix("_scale")  # of the first tensor with these parameters
        assert re.fullmatch(r"q\d+", prefix) and zero == f"{prefix}_zero_point"
        assert re.fullmatch(r"q\d+_quantized", node.outputs[0].name)
    # No value_info for generated values: the graph output keeps its type, nothing else new.
    added = [v for n in model.graph for v in n.outputs if v.name.startswith("q")]
    assert added and all(v.type is None for v in added)


def _matmul_gemm_model() -> onnx.ModelProto:
    return make_model(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"]),
            oh.make_node("Relu", ["m"], ["r"]),
            oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 32])],
        [oh.make_tensor_value_info("y", F, ["N", 16])],
        {
            "w": RNG.standard_normal((32, 64)).astype(np.float32),
            "w2": RNG.standard_normal((16, 64)).astype(np.float32),
            "b2": RNG.standard_normal(16).astype(np.float32),
        },
    )


@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_weights_carry_no_zero_point_and_onnxruntime_still_fuses(tmp_path, per_channel):
    """DQ(weight) without a zero point is fused into QLinearConv and QLinearMatMul; Gemm's
    weight keeps its zero point, without which onnxruntime 1.32 leaves the Gemm in float."""
    for proto, feeds in (
        (_conv_relu_pool(), {"x": RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)}),
        (_matmul_gemm_model(), {"x": RNG.standard_normal((8, 4, 32)).astype(np.float32)}),
    ):
        path, model = _quantize(proto, feeds, tmp_path, per_channel=per_channel)
        for node in model.graph:
            if node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
                continue
            reader = node.outputs[0].uses()[0].node.op_type
            has_zero_point = len(node.inputs) == 3
            assert has_zero_point == (reader == "Gemm" and node.inputs[0].dtype.name == "INT8")
        ops = _optimized_ops(path, tmp_path)
        assert not {"Conv", "MatMul", "Gemm"} & set(ops)
        assert ops.count("QLinearConv") == 2 or ops.count("QGemm") == 1
