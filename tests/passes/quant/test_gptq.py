"""GPTQ rounding (``passes/quant/gptq.py``) and quant-weight's ``rounding=gptq``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import gptq
from onnx_shrink.passes.quant.blockwise import quantize_blocks, quantize_blocks_gptq
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass
from tests.helpers import make_model, run_ort

F = onnx.TensorProto.FLOAT
K, N = 64, 24


MIXING = np.random.default_rng(99).standard_normal((6, K))


def _correlated_inputs(rows: int, seed: int) -> np.ndarray:
    """Rows of K features driven by 6 factors (the same ones for every seed) plus a little
    noise: rounding errors of different columns can cancel in the output, which is what GPTQ
    exploits."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((rows, 6))
    return (factors @ MIXING + 0.05 * rng.standard_normal((rows, K))).astype(np.float32)


def _grid(w: np.ndarray, bits: int = 4):
    """A symmetric per-row grid for ``w`` ``[rows, K]``: step and zero ``[rows, K]``, bounds."""
    high = 2 ** (bits - 1) - 1
    step = np.abs(w).max(axis=1, keepdims=True) / high
    return np.broadcast_to(step, w.shape), np.zeros(w.shape), -high, high


def _output_error(x: np.ndarray, w: np.ndarray, dequantized: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (dequantized - w).T) / np.linalg.norm(x @ w.T))


def test_gptq_codes_move_the_layer_output_less_than_nearest_codes_on_new_inputs():
    w = np.random.default_rng(0).standard_normal((N, K))
    x = _correlated_inputs(512, seed=1)
    step, zero, low, high = _grid(w)
    codes = gptq.gptq_codes(w, x.T.astype(np.float64) @ x, step, zero, low, high)
    nearest = np.clip(np.rint(w / step), low, high)
    assert np.array_equal(codes, np.rint(codes)) and codes.min() >= low and codes.max() <= high
    held_out = _correlated_inputs(256, seed=2)
    ours = _output_error(held_out, w, codes * step)
    plain = _output_error(held_out, w, nearest * step)
    assert ours < 0.6 * plain, (ours, plain)


def test_a_column_whose_input_is_always_zero_keeps_its_nearest_code_and_passes_no_error():
    w = np.random.default_rng(3).standard_normal((N, K))
    x = _correlated_inputs(256, seed=4)
    x[:, 5] = 0.0
    step, zero, low, high = _grid(w)
    gram = x.T.astype(np.float64) @ x
    codes = gptq.gptq_codes(w, gram, step, zero, low, high)
    assert np.array_equal(codes[:, 5], np.clip(np.rint(w[:, 5] / step[:, 5]), low, high))
    # The other columns are rounded exactly as without that column.
    keep = np.arange(K) != 5
    alone = gptq.gptq_codes(
        w[:, keep], gram[np.ix_(keep, keep)], step[:, keep], zero[:, keep], low, high
    )
    assert np.array_equal(codes[:, keep], alone)


def test_the_codes_do_not_depend_on_how_many_columns_are_updated_at_once(monkeypatch):
    w = np.random.default_rng(5).standard_normal((N, K))
    x = _correlated_inputs(256, seed=6)
    args = (w, x.T.astype(np.float64) @ x, *_grid(w))
    wide = gptq.gptq_codes(*args)
    monkeypatch.setattr(gptq, "BLOCK", 7)
    assert np.array_equal(gptq.gptq_codes(*args), wide)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_blocks_keep_nearest_roundings_grid_and_padding(symmetric):
    w = np.random.default_rng(7).standard_normal((N, 100)).astype(np.float32)  # a padded block
    x = np.random.default_rng(8).standard_normal((300, 100))
    nearest = quantize_blocks(w, bits=4, block_size=32, symmetric=symmetric)
    ours = quantize_blocks_gptq(w, x.T @ x, bits=4, block_size=32, symmetric=symmetric)
    assert np.array_equal(ours.scales, nearest.scales)
    assert np.array_equal(ours.zero_points, nearest.zero_points)
    assert np.array_equal(ours.codes.reshape(N, -1)[:, 100:], nearest.codes.reshape(N, -1)[:, 100:])
    assert not np.array_equal(ours.codes, nearest.codes)
    assert ours.codes.dtype == nearest.codes.dtype


def _two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    return make_model(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"]),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", K])],
        [oh.make_tensor_value_info("y", F, ["N", 32])],
        {
            "w1": rng.standard_normal((K, 96)).astype(np.float32),
            "w2": rng.standard_normal((96, 32)).astype(np.float32),
        },
    )


@pytest.mark.parametrize("layout", ["matmulnbits", "dequantize_linear"])
def test_quant_weight_with_gptq_is_closer_to_float_on_new_inputs_at_the_same_size(tmp_path, layout):
    proto = _two_matmuls()
    np.savez(tmp_path / "calib.npz", x=_correlated_inputs(256, seed=10))
    held_out = _correlated_inputs(128, seed=11)
    reference = run_ort(proto.SerializeToString(), {"x": held_out})[0]
    errors, sizes = {}, {}
    for rounding in ("nearest", "gptq"):
        result = onnx_shrink.shrink(
            proto,
            passes=[WeightOnlyQuantPass(rounding=rounding, format=layout, min_weight_elements=0)],
            data=tmp_path / "calib.npz",
            check=False,
        )
        data = io.to_bytes(result.model)
        got = run_ort(data, {"x": held_out})[0]
        errors[rounding] = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        sizes[rounding] = len(data)
    assert errors["gptq"] < 0.7 * errors["nearest"], errors
    assert sizes["gptq"] == sizes["nearest"]


def test_quant_weight_with_gptq_needs_statistics_and_says_how_to_give_them():
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration statistics"):
        WeightOnlyQuantPass(rounding="gptq")(io.load(_two_matmuls()))
