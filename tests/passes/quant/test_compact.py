"""The bytes of a quantized model: generated names, omitted zero points, narrow storage."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import compact
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from tests.helpers import make_model, run_ort
from tests.passes.quant.test_dynamic import dynamic_bound
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


def test_float16_scales_round_up_by_less_than_a_float16_step():
    scale = np.exp(RNG.uniform(np.log(1e-30), np.log(1e3), 10_000)).astype(np.float32)
    rounded = compact.float16_scale(scale)
    assert np.array_equal(rounded.astype(np.float16).astype(np.float32), rounded)
    assert np.all(rounded >= scale)
    assert np.all(rounded - scale <= np.maximum(scale * 2.0**-10, 2.0**-24))
    too_large = np.array([1.0, 1e5], np.float32)  # float16 ends at 65504
    np.testing.assert_array_equal(compact.float16_scale(too_large), too_large)


def _constants_model() -> onnx.ModelProto:
    ids = np.arange(512, dtype=np.int64).reshape(1, 512)
    return make_model(
        [
            oh.make_node("Mul", ["x", "exact"], ["a"]),
            oh.make_node("Add", ["a", "inexact"], ["b"]),
            oh.make_node("Mul", ["b", "small"], ["c"]),
            oh.make_node("Gather", ["c", "ids"], ["y"], axis=1),
        ],
        [oh.make_tensor_value_info("x", F, [1, 512])],
        [oh.make_tensor_value_info("y", F, [1, 1, 512])],
        {
            "exact": np.full((1, 512), 0.375, np.float32),
            "inexact": RNG.standard_normal((1, 512)).astype(np.float32),
            "small": np.array([2.0], np.float32),
            "ids": ids,
        },
    )


def test_narrow_storage_changes_no_value_and_onnxruntime_folds_its_casts(tmp_path):
    proto = _constants_model()
    model = io.load(proto)
    assert compact.store_narrow(model) == 2
    stored = {v.name: v.const_value.dtype.name for v in model.graph.initializers.values()}
    assert stored == {"exact": "FLOAT16", "inexact": "FLOAT", "small": "FLOAT", "ids": "INT16"}
    saved = io.save(model, tmp_path / "narrow.onnx")
    onnx.checker.check_model(str(saved.path), full_check=True)
    assert saved.path.stat().st_size < len(proto.SerializeToString()) - 1500
    x = RNG.standard_normal((1, 512)).astype(np.float32)
    (expected,) = run_ort(proto.SerializeToString(), {"x": x})
    (got,) = run_ort(saved.path, {"x": x})
    np.testing.assert_array_equal(got, expected)
    assert "Cast" not in _optimized_ops(saved.path, tmp_path)


def test_narrowing_a_clone_leaves_the_originals_types_alone():
    """ir.Model.clone shares type objects and onnx_ir's dtype setter changes them in place:
    narrowing a clone retyped the original's int64 ids as int16 (with int64 data)."""
    original = io.load(_constants_model())
    clone = original.clone()
    io.unshare_tensors(clone)
    compact.store_narrow(clone)
    assert clone.graph.initializers["ids"].dtype.name == "INT16"
    for value in original.graph.initializers.values():
        assert value.dtype == value.const_value.dtype, value.name


def test_graph_inputs_are_never_narrowed():
    proto = _constants_model()
    proto.graph.input.append(oh.make_tensor_value_info("exact", F, [1, 512]))
    model = io.load(proto)
    compact.store_narrow(model)
    assert model.graph.initializers["exact"].const_value.dtype.name == "FLOAT"


def test_static_weights_get_float16_scales_and_keep_their_integer_kernels(tmp_path):
    feeds = {"x": RNG.standard_normal((8, 4, 32)).astype(np.float32)}
    proto = _matmul_gemm_model()
    (tmp_path / "wide").mkdir()
    (tmp_path / "narrow").mkdir()
    wide, _ = _quantize(proto, feeds, tmp_path / "wide", narrow_storage=False)
    narrow, model = _quantize(proto, feeds, tmp_path / "narrow")
    assert model.graph.initializers["w_scale"].const_value.dtype.name == "FLOAT16"
    assert narrow.stat().st_size < wide.stat().st_size
    assert _optimized_ops(narrow, tmp_path) == _optimized_ops(wide, tmp_path)
    x = feeds["x"][0]
    (reference,) = run_ort(proto.SerializeToString(), {"x": x})
    (got_wide,) = run_ort(wide, {"x": x})
    (got,) = run_ort(narrow, {"x": x})
    # A scale grows by less than 2^-10: the error stays what it was, within a few percent.
    error, error_wide = np.abs(got - reference).max(), np.abs(got_wide - reference).max()
    assert error < 1.1 * error_wide


def test_dynamic_quantization_with_narrow_storage_runs_the_same_fused_kernel(tmp_path):
    w = (RNG.standard_normal((64, 96)) * 0.1).astype(np.float32)
    proto = make_model(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        [oh.make_tensor_value_info("x", F, ["N", 64])],
        [oh.make_tensor_value_info("y", F, ["N", 96])],
        {"w": w},
    )
    model = QuantDynamicPass()(io.load(proto)).model
    scale = model.graph.initializers["w_scale"].const_value
    assert scale.dtype.name == "FLOAT16"
    saved = io.save(model, tmp_path / "dynamic.onnx").path
    assert _optimized_ops(saved, tmp_path) == ["DynamicQuantizeMatMul"]
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    (y,) = run_ort(saved, {"x": x})
    assert np.all(np.abs(y - x @ w) <= dynamic_bound(x, w))
