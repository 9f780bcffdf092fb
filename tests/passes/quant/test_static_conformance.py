"""One tiny graph per placement rule the issue names, each quantized by ``quant`` and run on
onnxruntime: the ops fuse into the integer kernels the rule is for, the tensors that must
share a scale share it, and the outputs stay within a few quantization steps of fp32.
(Conv+Relu, MaxPool, residual Add, Resize, SiLU and MatMul have theirs in
``test_static_placement``.)"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from tests.helpers import make_model, run_ort
from tests.passes.quant.test_static_placement import _optimized_ops, _quantize

F = onnx.TensorProto.FLOAT


def _weights(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 0.3).astype(np.float32) for shape in shapes]


def _image_model(nodes, initializers, output_shape):
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", *output_shape])],
        initializers,
    )


def _concat():
    wa, wb, wc = _weights(1, (4, 3, 3, 3), (4, 3, 3, 3), (4, 8, 1, 1))
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1]),
        oh.make_node("Concat", ["a", "b"], ["c"], axis=1),
        oh.make_node("Conv", ["c", "wc"], ["y"]),
    ]
    return _image_model(nodes, {"wa": wa, "wb": wb, "wc": wc}, [4, 8, 8])


def _pools_flatten_gemm():
    wa, wb, wg, bg = _weights(2, (4, 3, 3, 3), (6, 4, 3, 3), (5, 6), (5,))
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p", "wb"], ["b"], pads=[1, 1, 1, 1]),
        oh.make_node("GlobalAveragePool", ["b"], ["g"]),
        oh.make_node("Flatten", ["g"], ["f"]),
        oh.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1),
    ]
    return _image_model(nodes, {"wa": wa, "wb": wb, "wg": wg, "bg": bg}, [5])


def _split():
    wa, w0, w1 = _weights(3, (8, 3, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3))
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Split", ["a", "sizes"], ["s0", "s1"], axis=1),
        oh.make_node("Conv", ["s0", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["s1", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("Concat", ["c0", "c1"], ["y"], axis=1),
    ]
    sizes = np.array([4, 4], np.int64)
    return _image_model(nodes, {"wa": wa, "sizes": sizes, "w0": w0, "w1": w1}, [8, 8, 8])


def _clip_and_shape_ops():
    wa, wb = _weights(4, (4, 3, 3, 3), (4, 4, 3, 3))
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Clip", ["a", "lo", "hi"], ["r"]),
        oh.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]),
        oh.make_node("Unsqueeze", ["t", "axes"], ["u"]),
        oh.make_node("Squeeze", ["u", "axes"], ["q"]),
        oh.make_node("Conv", ["q", "wb"], ["y"], pads=[1, 1, 1, 1]),
    ]
    constants = {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    constants["axes"] = np.array([2], np.int64)
    return _image_model(nodes, {"wa": wa, "wb": wb, **constants}, [4, 8, 8])


CASES = {
    # graph: (integer kernels onnxruntime must run, float ops that must be gone,
    #         tensors that share the scale of the first)
    "concat": (_concat, {"QLinearConv", "QLinearConcat"}, {"Conv", "Concat"}, ()),
    "pools, flatten, gemm": (
        _pools_flatten_gemm,
        {"QLinearConv", "QLinearAveragePool", "QLinearGlobalAveragePool", "QGemm"},
        {"Conv", "AveragePool", "GlobalAveragePool", "Gemm"},
        ("g", "f"),
    ),
    "split": (_split, {"QLinearConv", "Split", "QLinearConcat"}, {"Conv"}, ("a", "s0", "s1")),
    "clip and shape ops": (
        _clip_and_shape_ops,
        {"QLinearConv", "Unsqueeze", "Squeeze"},
        {"Conv", "Clip"},
        ("r", "q"),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_placement_rule_runs_in_integer_kernels_and_stays_close(tmp_path, case):
    build, kernels, gone, sharing = CASES[case]
    proto = build()
    x = np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path)

    ops = _optimized_ops(path, tmp_path)
    assert kernels <= set(ops), ops
    assert not gone & set(ops), ops
    # One QuantizeLinear in and one DequantizeLinear out: integers in between.
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1, ops
    params = {n.inputs[0].name: n.inputs[1:] for n in model.graph if n.op_type == "QuantizeLinear"}
    for name in sharing[1:]:
        assert params[name] == params[sharing[0]], name  # the very same initializers

    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(path, {"x": x})[0]
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


def _attention_and_norms(masked: bool):
    """Softmax, LayerNormalization and a decomposed RMS norm (Pow, ReduceMean, Sqrt, Div)
    between MatMuls; ``masked``: the scores get an additive mask of float32-min first."""
    d = 8
    weights = _weights(6, (d, d), (d, d), (d, d))
    scores = ["q"]
    nodes = [oh.make_node("MatMul", ["x", "wq"], ["q"])]
    if masked:
        nodes.append(oh.make_node("Add", ["q", "mask"], ["masked"]))
        scores = ["masked"]
    nodes += [
        oh.make_node("Softmax", scores, ["probs"], axis=-1),
        oh.make_node("MatMul", ["probs", "wv"], ["v"]),
        oh.make_node("LayerNormalization", ["v", "g", "b"], ["n"], axis=-1),
        oh.make_node("MatMul", ["n", "wo"], ["o"]),
        oh.make_node("Pow", ["o", "two"], ["squares"]),
        oh.make_node("ReduceMean", ["squares"], ["mean"], axes=[-1]),
        oh.make_node("Sqrt", ["mean"], ["rms"]),
        oh.make_node("Div", ["o", "rms"], ["y"]),
    ]
    constants = {"g": np.full(d, 1.5, np.float32), "b": np.full(d, 0.1, np.float32)}
    constants["two"] = np.array(2.0, np.float32)
    if masked:
        constants["mask"] = np.where(np.triu(np.ones((4, d)), 1), np.finfo(np.float32).min, 0)
        constants["mask"] = constants["mask"].astype(np.float32)
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, [4, d])],
        [oh.make_tensor_value_info("y", F, [4, d])],
        {"wq": weights[0], "wv": weights[1], "wo": weights[2], **constants},
    )


def test_sensitive_ops_are_quantized_when_asked_and_softmax_runs_as_qlinearsoftmax(tmp_path):
    proto = _attention_and_norms(masked=False)
    x = np.random.default_rng(7).standard_normal((16, 4, 8)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path, sensitive_ops=True)

    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert {"q", "probs", "v", "n", "o", "squares", "mean", "rms"} <= quantized
    last = [n.op_type for n in model.graph][-3:]
    assert last == ["Div", "QuantizeLinear", "DequantizeLinear"]  # the output keeps its name
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert [v.name for v in norm.inputs[1:]] == ["g", "b"]  # its scale and bias stay float
    ops = _optimized_ops(path, tmp_path)
    assert {"QLinearSoftmax", "QLinearMatMul"} <= set(ops) and "Softmax" not in ops
    reference = run_ort(proto.SerializeToString(), {"x": x[0]})[0]
    got = run_ort(path, {"x": x[0]})[0]
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


def test_asked_or_not_a_softmax_reading_mask_sentinels_stays_float(tmp_path):
    proto = _attention_and_norms(masked=True)
    x = np.random.default_rng(7).standard_normal((16, 4, 8)).astype(np.float32)
    _, model = _quantize(proto, {"x": x}, tmp_path, sensitive_ops=True)
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert "masked" not in quantized
    assert "n" in quantized  # the rest of the request still holds
