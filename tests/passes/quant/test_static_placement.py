"""Placement rules of the static `quant` pass, each on a tiny graph, checked on onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import Statistics
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import cosine, make_model, run_ort

RNG = np.random.default_rng(0)
F = onnx.TensorProto.FLOAT


def _quantize(proto, feeds, tmp_path, **options):
    """Calibrate on ``feeds`` (arrays with samples on axis 0), quantize, save, return paths."""
    model = io.load(proto)
    np.savez(tmp_path / "calib.npz", **feeds)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "calib.npz")
    quant = QuantPass(**options)
    stats = collect.collect(model, quant.requests(model), dataset)
    quant.bind(stats)(model)
    saved = io.save(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(saved.path), full_check=True)
    return saved.path, model


def _optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _ops(model):
    return [n.op_type for n in model.graph]


def _conv_relu_pool():
    """The same model at every call (other test modules use it too)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    return make_model(
        [
            oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            oh.make_node("Conv", ["p", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            oh.make_node("Add", ["c2", "p"], ["s"]),
            oh.make_node("Relu", ["s"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
        [oh.make_tensor_value_info("y", F, ["N", 8, 8, 8])],
        {"w": w, "b": rng.standard_normal(8).astype(np.float32) * 0.1, "w2": w2},
    )


def test_a_cnn_runs_entirely_in_integer_kernels_and_stays_close(tmp_path):
    proto = _conv_relu_pool()
    x = RNG.standard_normal((32, 3, 16, 16)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path)
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 2 and "QLinearAdd" in ops
    assert "Conv" not in ops and "Add" not in ops and "MaxPool" not in ops  # NhwcMaxPool on u8
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    # A few quantization steps of the output range at most.
    assert np.abs(got - reference).max() < 8 * reference.max() / 255


def test_relu_is_folded_into_the_producers_range(tmp_path):
    _, model = _quantize(
        _conv_relu_pool(), {"x": RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)}, tmp_path
    )
    conv = next(n for n in model.graph if n.op_type == "Conv")
    relu = conv.outputs[0].uses()[0].node
    assert relu.op_type == "Relu"  # nothing between Conv and Relu
    assert [u.node.op_type for u in relu.outputs[0].uses()] == ["QuantizeLinear"]


def test_maxpool_and_reshape_share_their_inputs_scale(tmp_path):
    w = RNG.standard_normal((16, 4)).astype(np.float32)
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"]),
            oh.make_node("Reshape", ["m", "shape"], ["r"]),
            oh.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, [2, 16])],
        [oh.make_tensor_value_info("y", F, [8, 3])],
        {"w": w, "shape": np.array([8, 1], np.int64), "w2": np.ones((1, 3), np.float32)},
    )
    _, model = _quantize(proto, {"x": RNG.standard_normal((4, 2, 16)).astype(np.float32)}, tmp_path)
    params = {n.inputs[0].name: n.inputs[1:] for n in model.graph if n.op_type == "QuantizeLinear"}
    assert params["r"] == params["m"]  # the very same scale and zero point initializers


def test_weights_are_per_channel_s8_and_biases_int32(tmp_path):
    _, model = _quantize(
        _conv_relu_pool(), {"x": RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)}, tmp_path
    )
    inits = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    assert inits["w_quantized"].dtype == np.int8 and inits["w_scale"].shape == (8,)
    assert inits["b_quantized"].dtype == np.int32
    x_scale = next(n for n in model.graph if n.op_type == "QuantizeLinear").inputs[1]
    expected = x_scale.const_value.numpy() * inits["w_scale"].astype(np.float32)
    np.testing.assert_allclose(inits["b_scale"], expected, rtol=1e-6)
    dq = next(n for n in model.graph if n.outputs[0].name == "w_dequantized")
    assert dq.attributes["axis"].as_int() == 0


def test_softmax_and_layernorm_stay_float_and_mask_sentinels_are_never_quantized(tmp_path):
    d = 8
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "wq"], ["q"]),
            oh.make_node("MatMul", ["q", "xt"], ["scores"]),
            oh.make_node("Add", ["scores", "mask"], ["masked"]),
            oh.make_node("Softmax", ["masked"], ["probs"], axis=-1),
            oh.make_node("MatMul", ["probs", "x"], ["ctx"]),
            oh.make_node("LayerNormalization", ["ctx", "g", "b"], ["y"], axis=-1),
        ],
        [
            oh.make_tensor_value_info("x", F, [4, d]),
            oh.make_tensor_value_info("xt", F, [d, 4]),
            oh.make_tensor_value_info("mask", F, [4, 4]),
        ],
        [oh.make_tensor_value_info("y", F, [4, d])],
        {
            "wq": RNG.standard_normal((d, d)).astype(np.float32),
            "g": np.ones(d, np.float32),
            "b": np.zeros(d, np.float32),
        },
    )
    x = RNG.standard_normal((6, 4, d)).astype(np.float32)
    mask = np.where(np.triu(np.ones((4, 4)), 1), np.finfo(np.float32).min, 0).astype(np.float32)
    feeds = {"x": x, "xt": np.swapaxes(x, 1, 2).copy(), "mask": np.stack([mask] * 6)}
    path, model = _quantize(proto, feeds, tmp_path)
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert "masked" not in quantized and "y" not in quantized
    assert {"Softmax", "LayerNormalization"} <= set(_ops(model))
    sample = {k: v[0] for k, v in feeds.items()}
    reference = run_ort(proto.SerializeToString(), sample)[0]
    got = run_ort(path, sample)[0]
    assert np.isfinite(got).all() and cosine(reference, got) > 0.99


def test_exclusions_by_op_type_name_and_regex(tmp_path):
    feeds = {"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)}
    for options in ({"exclude_op_types": ("Conv",)}, {"exclude": ("conv_.*",)}):
        proto = _conv_relu_pool()
        for i, node in enumerate(proto.graph.node):
            node.name = f"conv_{i}" if node.op_type == "Conv" else f"n{i}"
        _, model = _quantize(proto, feeds, tmp_path, **options)
        assert all(
            not (n.inputs[1].producer() and n.inputs[1].producer().op_type == "DequantizeLinear")
            for n in model.graph
            if n.op_type == "Conv"
        )


def test_exclusions_that_name_nothing_are_warned_about_and_those_that_match_are_not(
    tmp_path, caplog
):
    proto = _conv_relu_pool()
    for i, node in enumerate(proto.graph.node):
        node.name = f"conv_{i}" if node.op_type == "Conv" else f"n{i}"
    feeds = {"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)}
    options = {"exclude": ("n[12]", "nomatch"), "exclude_op_types": ("MaxPool", "Gemmm")}
    with caplog.at_level(logging.WARNING):
        _quantize(proto, feeds, tmp_path, **options, int16=("n1", "nope"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3, warned
    assert "quant.exclude: 'nomatch' matches no node name" in warned[0]
    assert "'conv_0'" in warned[0]  # what the model's names look like
    assert "quant.int16: 'nope' matches no node name" in warned[1]
    assert "quant.exclude_op_types: 'Gemmm' matches no op type" in warned[2]


def test_opset_11_models_get_per_channel_weights_onnxruntime_loads(tmp_path, caplog):
    proto = _conv_relu_pool()
    proto.opset_import[0].version = 11  # Conv, Relu, MaxPool and Add read the same in 11
    with caplog.at_level(logging.INFO):
        path, model = _quantize(
            proto, {"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)}, tmp_path
        )
    assert model.opset_imports[""] >= 13
    # onnxscript's converter warns that it falls back to onnx's, as it was asked to: the user
    # is told what happened, once, and not warned.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "converted the model from opset 11 to 13" in caplog.text
    assert np.isfinite(run_ort(path, {"x": np.ones((1, 3, 16, 16), np.float32)})[0]).all()


def test_requests_convert_and_type_the_model_so_apply_infers_types_once(tmp_path, monkeypatch):
    from onnx_shrink.passes.quant import value_types

    proto = _conv_relu_pool()
    proto.opset_import[0].version = 11
    model = io.load(proto)
    inferred = []
    infer = value_types.infer_types
    monkeypatch.setattr(value_types, "infer_types", lambda m: inferred.append(1) or infer(m))
    quant = QuantPass()
    requests = quant.requests(model)
    assert model.opset_imports[""] == 13 and inferred == [1]  # calibrated as apply will see it
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((4, 3, 16, 16)).astype(np.float32))
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "calib.npz")
    quant.bind(collect.collect(model, requests, dataset))(model)
    assert inferred == [1]
    assert "DequantizeLinear" in _ops(model)


def test_graph_outputs_keep_their_names(tmp_path):
    path, model = _quantize(
        _conv_relu_pool(), {"x": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)}, tmp_path
    )
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "DequantizeLinear"


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_produces_a_working_model(tmp_path, method):
    x = RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)
    proto = _conv_relu_pool()
    path, _ = _quantize(proto, {"x": x}, tmp_path, calibration=method)
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    assert cosine(reference, got) > 0.99


def test_only_tensors_that_can_get_qdq_are_measured(tmp_path):
    """An Add fed by a graph input is no integer kernel's neighbour whatever the ranges, so
    neither its inputs nor its output cost a range or a histogram; the plan made from real
    statistics uses only measured tensors."""
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"]),
            oh.make_node("Add", ["m", "skip"], ["a"]),
            oh.make_node("LayerNormalization", ["a", "g"], ["y"], axis=-1),
        ],
        [
            oh.make_tensor_value_info("x", F, ["N", 16]),
            oh.make_tensor_value_info("skip", F, ["N", 4]),
        ],
        [oh.make_tensor_value_info("y", F, ["N", 4])],
        {"w": RNG.standard_normal((16, 4)).astype(np.float32), "g": np.ones(4, np.float32)},
    )
    model = io.load(proto)
    requests = QuantPass().requests(model)
    assert {(r.tensor, r.kind) for r in requests} == {("x", "minmax"), ("x", "histogram")}
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    feeds["skip"] = RNG.standard_normal((8, 4)).astype(np.float32)
    _, quantized = _quantize(proto, feeds, tmp_path)
    quantized_tensors = {n.inputs[0].name for n in quantized.graph if n.op_type == "QuantizeLinear"}
    assert quantized_tensors == {"x"}


@pytest.mark.parametrize("narrow_storage", [True, False])
def test_a_channel_of_zero_weights_keeps_its_bias(tmp_path, narrow_storage):
    """Its weight scale would be tiny and the int32 bias (input scale x that scale) clip to
    about 0; the scale is raised until the bias fits, which zero weights do not mind."""
    proto = _conv_relu_pool()
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[3] = 0.0
    b = onnx.numpy_helper.to_array(proto.graph.initializer[1]).copy()
    b[3] = 0.5
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    proto.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(b, "b"))
    x = RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)
    _, model = _quantize(proto, {"x": x}, tmp_path, narrow_storage=narrow_storage)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    dq = conv.inputs[2].producer()
    codes, scale = (v.const_value.numpy().astype(np.float64) for v in dq.inputs[:2])
    np.testing.assert_allclose(codes[3] * scale[3], 0.5, atol=scale[3])
    assert np.abs(codes).max() < 2**31 - 1


def _residual_block(bias_first: bool = True):
    """LayerNorm -> MatMul + bias -> residual Add -> LayerNorm, a transformer's dense sublayer
    (the bias Add's constant first, as torch exports it)."""
    rng = np.random.default_rng(2)
    d = 16
    return make_model(
        [
            oh.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1),
            oh.make_node("MatMul", ["ln", "w"], ["m"]),
            oh.make_node("Add", ["bias", "m"] if bias_first else ["m", "bias"], ["dense"]),
            oh.make_node("Add", ["dense", "ln"], ["residual"]),
            oh.make_node("LayerNormalization", ["residual", "g", "b"], ["y"], axis=-1),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 4, d])],
        [oh.make_tensor_value_info("y", F, ["N", 4, d])],
        {
            "g": np.ones(d, np.float32),
            "b": np.zeros(d, np.float32),
            "w": rng.standard_normal((d, d)).astype(np.float32) * 0.3,
            "bias": rng.standard_normal(d).astype(np.float32),
        },
    )


def test_a_float_consumer_reads_the_float_tensor_not_its_dequantized_copy(tmp_path):
    proto = _residual_block()
    x = RNG.standard_normal((8, 4, 16)).astype(np.float32) * 3
    path, model = _quantize(proto, {"x": x}, tmp_path, fused=False)
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization").outputs[0]
    assert sorted(u.node.op_type for u in ln.uses()) == ["Add", "QuantizeLinear"]
    assert "DequantizeLinear" not in _optimized_ops(path, tmp_path)  # all fused into kernels
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], reference, atol=0.1)


@pytest.mark.parametrize("bias_first", [True, False])
def test_a_matmul_and_its_bias_become_one_matmul_integer_to_float(tmp_path, bias_first):
    proto = _residual_block(bias_first)
    x = RNG.standard_normal((8, 4, 16)).astype(np.float32) * 3
    (tmp_path / "unfused").mkdir()
    unfused, _ = _quantize(proto, {"x": x}, tmp_path / "unfused", fused=False)
    path, model = _quantize(proto, {"x": x}, tmp_path, fused=True)
    fused = next(n for n in model.graph if n.op_type == "MatMulIntegerToFloat")
    assert fused.domain == "com.microsoft" and fused.inputs[6].name == "bias"
    assert "MatMul" not in _ops(model) and _ops(model).count("Add") == 1  # the residual
    ops = _optimized_ops(path, tmp_path)
    assert "DequantizeLinear" not in ops and "Add" not in ops  # Add + LayerNorm: SkipLayerNorm
    # The same arithmetic in one kernel: only float rounding apart.
    np.testing.assert_allclose(
        run_ort(path, {"x": x})[0], run_ort(unfused, {"x": x})[0], rtol=1e-4, atol=1e-4
    )


def test_a_matmul_with_16_bit_activations_keeps_its_bias_add(tmp_path):
    """MatMulIntegerToFloat takes 8-bit inputs only: the int16 option's MatMul is not fused."""
    x = RNG.standard_normal((8, 4, 16)).astype(np.float32)
    path, model = _quantize(_residual_block(), {"x": x}, tmp_path, int16=(".*",))
    assert "MatMulIntegerToFloat" not in _ops(model) and "MatMul" in _ops(model)
    reference = run_ort(_residual_block().SerializeToString(), {"x": x})[0]
    np.testing.assert_allclose(run_ort(path, {"x": x})[0], reference, atol=0.05)


def test_unfused_models_are_standard_onnx(tmp_path):
    x = RNG.standard_normal((8, 4, 16)).astype(np.float32)
    _, model = _quantize(_residual_block(), {"x": x}, tmp_path, fused=False)
    assert {n.domain for n in model.graph} <= {""}
    assert "com.microsoft" not in model.opset_imports


@pytest.mark.parametrize("asked", [False, True])
def test_matmuls_of_two_activations_stay_float_unless_asked(tmp_path, asked):
    d = 8
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "wq"], ["q"]),
            oh.make_node("MatMul", ["x", "wk"], ["k"]),
            oh.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
            oh.make_node("MatMul", ["q", "kt"], ["scores"]),
            oh.make_node("Softmax", ["scores"], ["y"], axis=-1),
        ],
        [oh.make_tensor_value_info("x", F, [4, d])],
        [oh.make_tensor_value_info("y", F, [4, 4])],
        {
            "wq": RNG.standard_normal((d, d)).astype(np.float32),
            "wk": RNG.standard_normal((d, d)).astype(np.float32),
        },
    )
    x = RNG.standard_normal((6, 4, d)).astype(np.float32)
    _, model = _quantize(proto, {"x": x}, tmp_path, activation_matmuls=asked)
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert ({"q", "kt"} <= quantized) == asked
    assert "x" in quantized  # the projections are quantized either way


def test_int16_widens_only_the_named_nodes_tensors_with_attention_matmuls_quantized(tmp_path):
    d = 8
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "wq"], ["q"], name="mq"),
            oh.make_node("MatMul", ["x", "wk"], ["k"], name="mk"),
            oh.make_node("Transpose", ["k"], ["kt"], perm=[1, 0], name="t"),
            oh.make_node("MatMul", ["q", "kt"], ["scores"], name="attention"),
            oh.make_node("MatMul", ["scores", "wo"], ["y"], name="mo"),
        ],
        [oh.make_tensor_value_info("x", F, [4, d])],
        [oh.make_tensor_value_info("y", F, [4, d])],
        {
            "wq": RNG.standard_normal((d, d)).astype(np.float32),
            "wk": RNG.standard_normal((d, d)).astype(np.float32),
            "wo": RNG.standard_normal((4, d)).astype(np.float32),
        },
    )
    x = RNG.standard_normal((6, 4, d)).astype(np.float32)
    _, model = _quantize(proto, {"x": x}, tmp_path, activation_matmuls=True, int16=("mq",))
    bits = {
        n.inputs[0].name: n.inputs[2].const_value.dtype.bitwidth
        for n in model.graph
        if n.op_type == "QuantizeLinear"
    }
    assert bits["x"] == bits["q"] == 16  # mq's input and output
    assert bits["scores"] == 8  # the attention MatMul's output: its node is not named


def _hard_swish_block(offset_after_product: bool):
    """Conv -> hard-swish as x * Clip(x + 3, 0, 6) -> [Add(c)] -> Conv: the block ``fold``
    leaves from a PP-LCNet stage whose affine sits before a padded depthwise Conv."""
    rng = np.random.default_rng(2)
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["c", "three"], ["shifted"]),
        oh.make_node("Clip", ["shifted", "zero", "six"], ["gate"]),
        oh.make_node("Mul", ["c", "gate"], ["swish"]),
    ]
    last = "swish"
    if offset_after_product:
        nodes.append(oh.make_node("Add", ["swish", "offset"], ["moved"]))
        last = "moved"
    nodes.append(oh.make_node("Conv", [last, "w2"], ["y"], pads=[1, 1, 1, 1]))
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])],
        {
            "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5,
            "b": rng.standard_normal(4).astype(np.float32) * 0.1,
            "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
            "three": np.array(3.0, np.float32),
            "zero": np.array(0.0, np.float32),
            "six": np.array(6.0, np.float32),
            "offset": np.array([-1.5], np.float32),
        },
    )


@pytest.mark.parametrize("offset_after_product", [False, True])
def test_a_constant_offset_on_a_glue_result_keeps_the_glue_chain_float(
    tmp_path, offset_after_product
):
    proto = _hard_swish_block(offset_after_product)
    x = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    path, _ = _quantize(proto, {"x": x}, tmp_path)
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 2
    if offset_after_product:
        # Add(3), Mul and the offset would each round again: the chain runs in float.
        assert "QLinearAdd" not in ops and "QLinearMul" not in ops
    else:
        assert "QLinearAdd" in ops and "QLinearMul" in ops
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


def _after_pool_block(step: str):
    """Conv -> MaxPool -> ``step`` by a constant -> Conv: MaxPool keeps its input's scale,
    so the step rounds once, like one right after the Conv."""
    rng = np.random.default_rng(3)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            oh.make_node(step, ["p", "k"], ["s"]),
            oh.make_node("Conv", ["s", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 4, 4])],
        {
            "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5,
            "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
            "k": np.array([1.5], np.float32),
        },
    )


@pytest.mark.parametrize("step", ["Add", "Mul"])
def test_a_constant_step_after_maxpool_still_runs_in_an_integer_kernel(tmp_path, step):
    proto = _after_pool_block(step)
    x = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    path, _ = _quantize(proto, {"x": x}, tmp_path)
    assert f"QLinear{step}" in _optimized_ops(path, tmp_path)


def test_resize_reads_its_scales_as_float_constants(tmp_path):
    """Only Resize's data input is quantized: scales of 1.0 read back from uint8 as 1.0039
    made every dim past 255 one longer (300 channels became 301)."""
    rng = np.random.default_rng(4)
    proto = make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest"),
            oh.make_node("Conv", ["u", "w2"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 4, 4])],
        [oh.make_tensor_value_info("y", F, ["N", 2, 8, 8])],
        {
            "w": rng.standard_normal((300, 3, 1, 1)).astype(np.float32),
            "scales": np.array([1.0, 1.0, 2.0, 2.0], np.float32),
            "w2": rng.standard_normal((2, 300, 1, 1)).astype(np.float32) * 0.1,
        },
    )
    x = RNG.standard_normal((8, 3, 4, 4)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path)
    resize = next(n for n in model.graph if n.op_type == "Resize")
    assert resize.inputs[0].producer().op_type == "DequantizeLinear"  # it runs on uint8
    assert resize.inputs[2].const_value is not None  # the scales as they were
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


def _silu_block():
    """Conv -> SiLU (x * Sigmoid(x), as YOLOv5/v8 and EfficientNet export it) -> Conv."""
    rng = np.random.default_rng(5)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Sigmoid", ["c"], ["g"]),
            oh.make_node("Mul", ["c", "g"], ["a"]),
            oh.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])],
        {
            "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5,
            "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
        },
    )


def test_silu_runs_in_integer_kernels_between_convs(tmp_path):
    proto = _silu_block()
    x = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    path, _ = _quantize(proto, {"x": x}, tmp_path)
    ops = _optimized_ops(path, tmp_path)
    assert {"QLinearSigmoid", "QLinearMul"} <= set(ops)
    assert ops.count("QLinearConv") == 2
    assert not {"Sigmoid", "Mul", "DequantizeLinear"} & set(ops[1:-1])  # int8 in between
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


@pytest.mark.parametrize("quant_pass", ["quant", "quant-dynamic"])
def test_a_float16_model_is_left_as_it_is_with_a_warning_to_quantize_before_fp16(
    tmp_path, caplog, quant_pass
):
    # QuantizeLinear reads float32 below opset 19: quantizing fp16's output wrote a model
    # onnxruntime refused (INVALID_GRAPH).
    import onnx_shrink
    from models import digits

    feeds = {"image": np.load(digits.TEST_DATA_PATH)["image"][:32]}
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(
            digits.MODEL_PATH,
            f"fold,fp16,{quant_pass}",
            output=tmp_path / "q.onnx",
            data=feeds,
            check=False,
        )
    assert not result.steps[-1].modified
    assert "float16" in caplog.text and f"--passes fold,{quant_pass},fp16" in caplog.text
    saved = onnx.load(str(tmp_path / "q.onnx"))
    assert not {"QuantizeLinear", "DynamicQuantizeMatMul"} & {n.op_type for n in saved.graph.node}
    run_ort(str(tmp_path / "q.onnx"), feeds)


def test_a_pass_that_can_quantize_nothing_leaves_the_model_untouched(tmp_path, caplog):
    proto = _conv_relu_pool()
    proto.opset_import[0].version = 11  # apply would convert it to 13 for per-channel weights
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    model = io.load(proto)
    before = io.to_bytes(model)
    quant = QuantPass(only=("n1",))  # a Relu: nothing of a quantizable op type is named
    with caplog.at_level(logging.WARNING):
        assert quant.requests(model) == []
        result = quant.bind(Statistics({}, 0, "none"))(model)
    assert not result.modified and "no node could be quantized" in caplog.text
    assert io.to_bytes(result.model) == before


def test_quantizing_twice_changes_nothing_the_second_time(tmp_path):
    # The second pass finds every candidate already quantized; its type inference must not
    # leave new value_info (or a new initializer order) in a model it reports unchanged.
    import onnx_shrink

    feeds = {"x": RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    once = onnx_shrink.shrink(_conv_relu_pool(), "quant", data=feeds, check=False)
    twice = onnx_shrink.shrink(once.model, "quant", data=feeds, check=False)
    assert not twice.steps[-1].modified
    assert io.to_bytes(twice.model) == io.to_bytes(once.model)


def test_bias_correction_with_only_is_warned_about(caplog):
    model = io.load(_conv_relu_pool())
    with caplog.at_level(logging.WARNING):
        QuantPass(only=("conv1",)).requests(model)
        QuantPass(bias_correction=True).requests(model)
        assert "bias_correction" not in caplog.text
        QuantPass(only=("conv1",), bias_correction=True).requests(model)
    assert "bias_correction does nothing with only" in caplog.text


def test_a_float16_model_from_a_file_keeps_its_opset(tmp_path, caplog):
    # Read back from a file, its types are unknown: quant infers them to see float16 before
    # it converts the opset (int16 asks for 21), and leaves the model as it was.
    import onnx_shrink
    from models import digits

    half = onnx_shrink.shrink(
        digits.MODEL_PATH, "fold,fp16", check=False, output=tmp_path / "h.onnx"
    )
    assert half.steps[-1].modified
    before = io.to_bytes(io.load(tmp_path / "h.onnx"))
    feeds = {"image": np.load(digits.TEST_DATA_PATH)["image"][:16]}
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(
            tmp_path / "h.onnx", "quant", sets=["quant.int16=.*"], data=feeds, check=False
        )
    assert not result.steps[0].modified and "put quant before it" in caplog.text
    assert "--passes fold,fp32,quant" in caplog.text
    assert io.to_bytes(result.model) == before
    # As the warning says: widened first, the same file is quantized.
    widened = onnx_shrink.shrink(tmp_path / "h.onnx", "fp32,quant", data=feeds, check=False)
    assert all(step.modified for step in widened.steps)
    assert "QuantizeLinear" in [node.op_type for node in widened.model.graph]


def test_calibration_inputs_holding_nan_are_named(tmp_path, caplog):
    x = RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    with caplog.at_level(logging.WARNING):
        _quantize(_conv_relu_pool(), {"x": x}, tmp_path)
    assert "calibration input 'x' holds 1 NaN/Inf values" in caplog.text


def test_float16_layers_left_beside_a_quantized_one_are_named(caplog):
    """A model exported in float16 but for its float32 embedding table (a Keras tagger):
    quant quantizes the table and says that the float16 MatMul stays as it is, and why."""
    half = onnx.TensorProto.FLOAT16
    nodes = [
        oh.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        oh.make_node("Cast", ["e"], ["e16"], to=half, name="to_half"),
        oh.make_node("MatMul", ["e16", "w"], ["y16"], name="dense"),
        oh.make_node("Cast", ["y16"], ["y"], to=onnx.TensorProto.FLOAT, name="to_float"),
    ]
    model = make_model(
        nodes,
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 32])],
        {
            "table": RNG.standard_normal((1000, 64)).astype(np.float32),
            "w": RNG.standard_normal((64, 32)).astype(np.float16),
        },
    )
    data = {"ids": RNG.integers(0, 1000, (8, 1, 4)).astype(np.int64)}
    with caplog.at_level(logging.DEBUG):
        result = shrink(model, "quant", data=data, check=False)
    assert result.steps[0].modified
    assert "1 MatMul nodes compute in float16/bfloat16 and stay as they are" in caplog.text
    assert "computes in float16/bfloat16" in caplog.text  # dense's reason, not "no activation"
    assert "quant: quantized 0 nodes" not in caplog.text
