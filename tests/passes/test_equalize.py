"""equalize: channel factors moved between layers leave the outputs as they were, reach
only what commutes with them, and bring an outlier channel into its quantizer's range."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.equalize import EqualizePass, outlier_factors
from tests.helpers import run_ort

RNG = np.random.default_rng(11)
CHANNELS = 8


def _model(nodes, weights: dict[str, np.ndarray], x: list, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * len(x))
            for name in outputs
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outlier_convs(middle: list | None = None) -> onnx.ModelProto:
    """Conv -> Relu -> [middle] -> Conv, whose first Conv's channel 3 sits near 200 (a bias
    far above its weights), as U²-Net-p's did."""
    w1 = RNG.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = np.full(CHANNELS, 0.1, np.float32)
    b1[3] = 200.0
    joined = any(node.op_type == "Concat" for node in middle or [])
    w2 = RNG.standard_normal((4, CHANNELS + 4 * joined, 3, 3)).astype(np.float32) * 0.2
    w2[:, 3] *= 0.01  # the offset's contribution is small, its rounding is not
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        *(middle or [helper.make_node("Identity", ["r1"], ["m"], "same")]),
        helper.make_node("Conv", ["m", "w2"], ["y"], "conv2", pads=[1, 1, 1, 1]),
    ]
    weights = {"w1": w1, "b1": b1, "w2": w2}
    if joined:
        weights["w0"] = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return _model(nodes, weights, [1, 3, 16, 16])


def _images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, 16, dtype=np.float32)
    base = ramp[None, None, :, None] * ramp[None, None, None, :]
    noise = rng.standard_normal((count, 3, 16, 16)).astype(np.float32)
    return base + 0.5 * noise


def _shrink(proto: onnx.ModelProto, passes: str, tmp_path, **kwargs) -> bytes:
    out = tmp_path / f"{passes.replace(',', '_')}.onnx"
    onnx_shrink.shrink(
        proto, passes, output=str(out), check=False, calibration={"x": _images(16, 0)}, **kwargs
    )
    return out.read_bytes()


def _relative_error(reference: bytes | onnx.ModelProto, candidate: bytes) -> float:
    if isinstance(reference, onnx.ModelProto):
        reference = reference.SerializeToString()
    x = _images(8, 1)
    want = np.concatenate([run_ort(reference, {"x": x[i : i + 1]})[0] for i in range(8)])
    got = np.concatenate([run_ort(candidate, {"x": x[i : i + 1]})[0] for i in range(8)])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _weights(model: bytes) -> dict[str, np.ndarray]:
    proto = onnx.load_from_string(model)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


MIDDLES = {
    "identity": None,
    "maxpool_resize": [
        helper.make_node("MaxPool", ["r1"], ["p"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Constant", [], ["scales"], value_floats=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Resize", ["p", "", "scales"], ["m"], "up", mode="linear"),
    ],
    "concat": [  # with 4 channels of a second Conv: the group holds the first 8 of 12
        helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["r1", "c0"], ["m"], "join", axis=1),
    ],
}


@pytest.mark.parametrize("middle", sorted(MIDDLES))
def test_outputs_stay_and_outlier_channel_comes_down(tmp_path, middle) -> None:
    proto = _outlier_convs(MIDDLES[middle])
    result = _shrink(proto, "equalize", tmp_path)
    assert _relative_error(proto, result) < 1e-5
    before, after = _weights(proto.SerializeToString()), _weights(result)
    bias = after["b1"]
    assert bias[3] < 20.0 < before["b1"][3]  # the outlier brought to the others' size
    assert np.sum(bias == before["b1"]) >= CHANNELS // 2  # those at most the median keep 1
    ratio = bias[3] / before["b1"][3]
    np.testing.assert_allclose(after["w2"][:, 3], before["w2"][:, 3] / ratio, rtol=1e-5)


def test_equalized_quantization_keeps_the_narrow_channels(tmp_path) -> None:
    proto = _outlier_convs()
    plain = _relative_error(proto, _shrink(proto, "quant", tmp_path))
    equalized = _relative_error(proto, _shrink(proto, "equalize,quant", tmp_path))
    assert equalized < plain / 2, (plain, equalized)


def test_layer_norm_scale_and_bias_move_into_the_matmuls(tmp_path) -> None:
    hidden = 16
    gamma = np.ones(hidden, np.float32)
    gamma[5] = 60.0  # an outlier feature, as transformers' LayerNorms grow
    beta = RNG.standard_normal(hidden).astype(np.float32) * 0.1
    weights = {
        "gamma": gamma,
        "beta": beta,
        "wq": RNG.standard_normal((hidden, 8)).astype(np.float32),
        "wv": RNG.standard_normal((hidden, 8)).astype(np.float32),
        "bq": RNG.standard_normal(8).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], "norm", axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q0"], "q"),
        helper.make_node("Add", ["q0", "bq"], ["y"], "q_bias"),
        helper.make_node("MatMul", ["n", "wv"], ["z"], "v"),
    ]
    proto = _model(nodes, weights, [1, 4, hidden], outputs=("y", "z"))
    x = RNG.standard_normal((16, 4, hidden)).astype(np.float32)
    out = tmp_path / "eq.onnx"
    onnx_shrink.shrink(proto, "equalize", output=str(out), check=False, calibration={"x": x})
    after = _weights(out.read_bytes())
    assert after["gamma"][5] < 20.0
    np.testing.assert_allclose(after["wq"][5] * after["gamma"][5], weights["wq"][5] * 60.0, 1e-5)
    for got, want in zip(
        run_ort(out.read_bytes(), {"x": x[:1]}),
        run_ort(proto.SerializeToString(), {"x": x[:1]}),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


DECLINES = {
    "sigmoid": (
        [helper.make_node("Sigmoid", ["r1"], ["m"], "squash")],
        "unknown op Sigmoid (squash) on the path",
    ),
    "gate": (
        [
            helper.make_node("ReduceMean", ["r1"], ["g"], "mean", axes=[2, 3]),
            helper.make_node("Mul", ["r1", "g"], ["m"], "gate"),
        ],
        "gate: Mul of two computed tensors",
    ),
    "offset": (
        [
            helper.make_node("Constant", [], ["one"], value_float=1.0),
            helper.make_node("Add", ["r1", "one"], ["m"], "shift"),
        ],
        "shift: adds one constant to every channel",
    ),
}


@pytest.mark.parametrize("case", sorted(DECLINES))
def test_a_group_through_what_does_not_commute_is_left(tmp_path, caplog, case) -> None:
    middle, reason = DECLINES[case]
    proto = _outlier_convs(middle)
    with caplog.at_level(logging.INFO, logger="onnx_shrink.passes.equalize"):
        result = _shrink(proto, "fold,equalize", tmp_path)  # fold: Constant to initializer
    assert f"declined group of conv1: {reason}" in caplog.text
    assert _weights(result)["b1"][3] == 200.0
    assert _relative_error(proto, result) < 1e-6


def test_a_weight_shared_with_a_layer_outside_keeps_its_values_there(tmp_path) -> None:
    proto = _outlier_convs()
    proto.graph.node.append(
        helper.make_node("Conv", ["x", "w1"], ["z"], "other", pads=[1, 1, 1, 1])
    )
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [None] * 4))
    result = _shrink(proto, "equalize", tmp_path)
    reference = proto.SerializeToString()
    x = _images(2, 3)
    for got, want in zip(
        run_ort(result, {"x": x[:1]}), run_ort(reference, {"x": x[:1]}), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert "w1" in _weights(result)  # the other Conv's, untouched


def test_outlier_factors_bring_the_wide_channels_to_the_median() -> None:
    ranges = np.array([1.0, 2.0, 0.0, 3.0, 40.0])
    np.testing.assert_allclose(outlier_factors(ranges, 4.0), [1.0, 1.0, 1.0, 1.2, 16.0])
    assert outlier_factors(ranges, 20.0) is None
    assert outlier_factors(np.zeros(3), 1.0) is None


def test_without_statistics_it_says_how_to_run_it() -> None:
    with pytest.raises(Exception, match="needs calibration statistics"):
        EqualizePass()(io.load(_outlier_convs()))
