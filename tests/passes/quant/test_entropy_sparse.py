"""``quant.calibration=entropy`` on tensors too small for its KL divergence (a squeeze-and-
excitation block's [N, C, 1, 1] values) gives them mse's range."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.static import QuantPass
from tests.helpers import make_model, run_ort

F = onnx.TensorProto.FLOAT


def _squeeze_excitation():
    """Conv -> ReLU -> squeeze-and-excitation (GlobalAveragePool, 1x1 Conv, ReLU, 1x1 Conv,
    HardSigmoid) scaling the features -> 1x1 Conv."""
    rng = np.random.default_rng(41)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["f"]),
            oh.make_node("GlobalAveragePool", ["f"], ["pooled"]),
            oh.make_node("Conv", ["pooled", "w_squeeze", "b_squeeze"], ["s"]),
            oh.make_node("Relu", ["s"], ["s_relu"]),
            oh.make_node("Conv", ["s_relu", "w_excite", "b_excite"], ["e"]),
            oh.make_node("HardSigmoid", ["e"], ["gate"], alpha=0.2, beta=0.5),
            oh.make_node("Mul", ["f", "gate"], ["scaled"]),
            oh.make_node("Conv", ["scaled", "w_out"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])],
        {
            "w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.5,
            "w_squeeze": rng.standard_normal((4, 16, 1, 1)).astype(np.float32),
            "b_squeeze": rng.standard_normal(4).astype(np.float32),
            "w_excite": rng.standard_normal((16, 4, 1, 1)).astype(np.float32),
            "b_excite": rng.standard_normal(16).astype(np.float32),
            "w_out": rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * 0.3,
        },
    )


def _relative_error(proto, calibration: str, x: np.ndarray, folder) -> float:
    np.savez(folder / "calib.npz", x=x[:16])
    model = onnx_shrink.shrink(
        proto,
        passes=[QuantPass(calibration=calibration)],
        data=folder / "calib.npz",
        check=False,
    ).model
    got = run_ort(io.to_bytes(model), {"x": x[16:]})[0]
    reference = run_ort(proto.SerializeToString(), {"x": x[16:]})[0]
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def test_entropy_on_a_squeeze_excitation_block_is_about_as_good_as_mse(tmp_path, caplog):
    proto = _squeeze_excitation()
    x = np.random.default_rng(42).standard_normal((48, 3, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO):
        entropy = _relative_error(proto, "entropy", x, tmp_path)
    mse = _relative_error(proto, "mse", x, tmp_path)
    # 16 samples of 4 and 16 values each: the block's tensors get mse's range.
    assert "tensor(s) with too few values for its KL divergence" in caplog.text
    assert entropy < 1.25 * mse + 1e-3
