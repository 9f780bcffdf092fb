"""GPTQ rounding (``passes/quant/gptq.py``) and quant-weight's ``rounding=gptq``."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import StatRequest
from onnx_shrink.passes.quant import gptq, gptq_grams
from onnx_shrink.passes.quant.blockwise import (
    pack_low_first,
    quantize_blocks,
    quantize_blocks_gptq,
)
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
    """A symmetric grid of one scale per row of ``w`` ``[rows, K]``: scales and zeros
    ``[rows, 1]``, every column in group 0, the code bounds."""
    high = 2 ** (bits - 1) - 1
    scales = np.abs(w).max(axis=1, keepdims=True) / high
    return scales, np.zeros_like(scales), np.zeros(w.shape[1], np.int64), -high, high


def _output_error(x: np.ndarray, w: np.ndarray, dequantized: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (dequantized - w).T) / np.linalg.norm(x @ w.T))


def test_gptq_codes_move_the_layer_output_less_than_nearest_codes_on_new_inputs():
    w = np.random.default_rng(0).standard_normal((N, K))
    x = _correlated_inputs(512, seed=1)
    scales, zeros, groups, low, high = _grid(w)
    codes = gptq.gptq_codes(w, x.T.astype(np.float64) @ x, scales, zeros, groups, low, high)
    nearest = np.clip(np.rint(w / scales), low, high)
    assert codes.min() >= low and codes.max() <= high
    held_out = _correlated_inputs(256, seed=2)
    ours = _output_error(held_out, w, codes * scales)
    plain = _output_error(held_out, w, nearest * scales)
    assert ours < 0.6 * plain, (ours, plain)


def test_a_column_whose_input_is_always_zero_keeps_its_nearest_code_and_passes_no_error():
    w = np.random.default_rng(3).standard_normal((N, K))
    x = _correlated_inputs(256, seed=4)
    x[:, 5] = 0.0
    scales, zeros, groups, low, high = _grid(w)
    gram = x.T.astype(np.float64) @ x
    codes = gptq.gptq_codes(w, gram, scales, zeros, groups, low, high)
    assert np.array_equal(codes[:, 5], np.clip(np.rint(w[:, 5] / scales[:, 0]), low, high))
    # The other columns are rounded exactly as without that column.
    keep = np.arange(K) != 5
    alone = gptq.gptq_codes(
        w[:, keep], gram[np.ix_(keep, keep)], scales, zeros, groups[keep], low, high
    )
    assert np.array_equal(codes[:, keep], alone)


def test_a_gram_that_is_not_finite_is_refused():
    w = np.random.default_rng(12).standard_normal((N, K))
    gram = np.eye(K)
    gram[3, 3] = np.nan
    with pytest.raises(np.linalg.LinAlgError, match="non-finite"):
        gptq.gptq_codes(w, gram, *_grid(w))


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


def _gptq_model(proto: onnx.ModelProto, data, **options) -> ir.Model:
    options = {"min_weight_elements": 0, **options}
    return onnx_shrink.shrink(
        proto, passes=[WeightOnlyQuantPass(**options)], data=data, check=False
    ).model


def _codes(model: ir.Model, weight: str) -> np.ndarray:
    return model.graph.initializers[f"{weight}_q4"].const_value.numpy()


def test_a_body_matmul_keeps_nearest_codes_even_where_its_input_shadows_a_measured_name():
    """The statistics engine measures the main graph: a Loop body's ``x`` ([4, 32]) is not
    the main graph's ``x`` ([N, 64]) whose Gram was measured."""
    rng = np.random.default_rng(13)
    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond"], ["cond_out"]),
            oh.make_node("MatMul", ["x", "wb"], ["x_out"]),
        ],
        "body",
        [
            oh.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x", F, [4, 32]),
        ],
        [
            oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x_out", F, [4, 32]),
        ],
    )
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "w"], ["h"]),
            oh.make_node("Loop", ["n", "", "s"], ["s_out"], body=body),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 64]), oh.make_tensor_value_info("s", F, [4, 32])],
        [
            oh.make_tensor_value_info("h", F, ["N", 64]),
            oh.make_tensor_value_info("s_out", F, [4, 32]),
        ],
        {
            "w": rng.standard_normal((64, 64)).astype(np.float32),
            "wb": rng.standard_normal((32, 32)).astype(np.float32),
            "n": np.array(2, np.int64),
        },
    )
    data = {
        "x": _correlated_inputs(64, seed=14),
        "s": rng.standard_normal((64, 4, 32)).astype(np.float32),
    }
    nearest, ours = (_gptq_model(proto, data, rounding=r) for r in ("nearest", "gptq"))
    assert np.array_equal(_codes(ours, "wb"), _codes(nearest, "wb"))
    assert not np.array_equal(_codes(ours, "w"), _codes(nearest, "w"))


def test_a_matmul_of_a_constant_table_keeps_nearest_codes_and_the_others_get_gptq():
    rng = np.random.default_rng(15)
    proto = make_model(
        [
            oh.make_node("MatMul", ["table", "wt"], ["p"]),
            oh.make_node("MatMul", ["x", "w"], ["h"]),
            oh.make_node("Add", ["h", "p"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, [8, K])],
        [oh.make_tensor_value_info("y", F, [8, K])],
        {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("table", (8, K)), ("wt", (K, K)), ("w", (K, K)))
        },
    )
    data = {"x": _correlated_inputs(64, seed=16).reshape(8, 8, K)}
    nearest, ours = (_gptq_model(proto, data, rounding=r) for r in ("nearest", "gptq"))
    assert np.array_equal(_codes(ours, "wt"), _codes(nearest, "wt"))
    assert not np.array_equal(_codes(ours, "w"), _codes(nearest, "w"))


def test_a_weight_two_matmuls_read_is_rounded_for_both_of_their_inputs(tmp_path):
    rng = np.random.default_rng(17)
    w = rng.standard_normal((K, 32)).astype(np.float32)
    proto = make_model(
        [oh.make_node("MatMul", ["a", "w"], ["ya"]), oh.make_node("MatMul", ["b", "w"], ["yb"])],
        [oh.make_tensor_value_info("a", F, ["N", K]), oh.make_tensor_value_info("b", F, ["N", K])],
        [
            oh.make_tensor_value_info("ya", F, ["N", 32]),
            oh.make_tensor_value_info("yb", F, ["N", 32]),
        ],
        {"w": w},
    )
    a, b = _correlated_inputs(128, seed=18), rng.standard_normal((128, K)).astype(np.float32)
    ours = _gptq_model(proto, {"a": a, "b": b}, rounding="gptq")
    summed = a.T.astype(np.float64) @ a + b.T.astype(np.float64) @ b
    expected = quantize_blocks_gptq(w.T, summed, bits=4, block_size=32, symmetric=True)
    packed = ours.graph.initializers["w_q4"].const_value.numpy()
    assert np.array_equal(packed, pack_low_first(expected.unsigned_codes(), 4))


def test_too_few_calibration_rows_for_a_weights_width_are_warned_about(caplog):
    data = {"x": _correlated_inputs(16, seed=19)}  # 16 rows for K = 64 columns
    with caplog.at_level(logging.WARNING):
        _gptq_model(_two_matmuls(), data, rounding="gptq")
    assert "gptq: 2 of 2 weights saw fewer calibration rows than their inputs' width" in caplog.text
    assert "(w1: 16 rows for 64 columns)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _gptq_model(_two_matmuls(), {"x": _correlated_inputs(128, seed=19)}, rounding="gptq")
    assert "fewer calibration rows" not in caplog.text


def test_gptq_without_matmuls_to_round_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        _gptq_model(
            _two_matmuls(),
            {"x": _correlated_inputs(8, seed=20)},
            rounding="gptq",
            op_types=("Gather",),
        )
    assert "rounding=gptq picks MatMul codes only; op_types has none" in caplog.text


def test_an_excluded_matmul_is_listed_once_where_gptq_looks_at_it_twice(caplog):
    """GPTQ looks at the MatMuls when it asks for Grams, when it sums them, and when it
    quantizes: ``-vv`` lists (and a nothing-quantized warning counts) each skipped node
    once."""
    proto = _two_matmuls()
    proto.graph.node[0].name, proto.graph.node[2].name = "first", "second"
    with caplog.at_level(logging.DEBUG, logger="onnx_shrink"):
        model = _gptq_model(
            proto, {"x": _correlated_inputs(128, seed=23)}, rounding="gptq", exclude=("second",)
        )
    assert caplog.text.count("skipping second (MatMul): excluded") == 1, caplog.text
    assert [n.name for n in model.graph if n.op_type == "MatMul"] == ["second"]


def test_grams_past_the_memory_budget_are_not_measured_and_keep_nearest_codes(caplog):
    data = {"x": _correlated_inputs(256, seed=21)}
    nearest = _gptq_model(_two_matmuls(), data, rounding="nearest")
    with caplog.at_level(logging.WARNING):
        ours = _gptq_model(_two_matmuls(), data, rounding="gptq", gram_memory_mb=0)
    assert "gptq: 2 of 2 MatMul inputs keep nearest rounding" in caplog.text
    assert all(np.array_equal(_codes(ours, w), _codes(nearest, w)) for w in ("w1", "w2"))
    # 1 MiB holds a 300-wide Gram (0.69 MiB), not a 400-wide one besides (1.22 MiB more).
    widths = {StatRequest("wide", "gram"): 400, StatRequest("narrow", "gram"): 300}
    taken = gptq_grams.within_budget(widths, 1, "quant-weight")
    assert taken == [StatRequest("narrow", "gram")]


def test_a_matmul_wider_than_gptq_takes_keeps_nearest_codes_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 80)  # w1 reads 64 columns, w2 96
    data = {"x": _correlated_inputs(256, seed=22)}
    nearest = _gptq_model(_two_matmuls(), data, rounding="nearest")
    with caplog.at_level(logging.WARNING):
        ours = _gptq_model(_two_matmuls(), data, rounding="gptq")
    assert "gptq: 1 MatMuls read inputs wider than 80 columns" in caplog.text
    assert np.array_equal(_codes(ours, "w2"), _codes(nearest, "w2"))
    assert not np.array_equal(_codes(ours, "w1"), _codes(nearest, "w1"))
