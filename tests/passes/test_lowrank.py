"""The `lowrank` pass: SVD math, rewrites of MatMul/Gemm/1x1 Conv on onnxruntime, rank choice."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import ChannelValues, Gram, Statistics, StatRequest
from onnx_shrink.passes import lowrank_svd
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.lowrank import LowRankPass, factorize, factors, refit
from onnx_shrink.passes.lowrank_svd import whitener
from onnx_shrink.passes.quant.static import QuantPass
from tests.helpers import make_model, run_ort

RNG = np.random.default_rng(0)
F = onnx.TensorProto.FLOAT
NO_STATS = Statistics({}, 0, "none")


def _low_rank(k: int, n: int, rank: int) -> np.ndarray:
    return (RNG.standard_normal((k, rank)) @ RNG.standard_normal((rank, n))).astype(np.float32)


def _rewrite(proto, pass_, stats=NO_STATS):
    model = io.load(proto)
    pass_.bind(stats)(model)
    return model, io.to_bytes(model)


def _ops(model):
    return [n.op_type for n in model.graph]


# ---- the math ------------------------------------------------------------------------------

matrices = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False),
)


@given(matrices, st.integers(0, 12))
@settings(max_examples=200, deadline=None)
def test_truncation_error_equals_the_discarded_singular_values(weight, rank):
    f = factorize(weight)
    rank = min(rank, len(f.s))
    a, b = factors(f, rank)
    expected = np.sqrt(np.sum(f.s[rank:] ** 2))
    assert np.linalg.norm(weight - a @ b) == pytest.approx(expected, abs=1e-9 * (1 + f.s.sum()))
    assert f.tail_energy()[rank] == pytest.approx(expected**2, abs=1e-9 * (1 + f.s.sum()) ** 2)


@given(matrices, st.integers(0, 12), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_whitened_truncation_error_is_the_output_error_on_the_calibration_inputs(
    weight, rank, seed
):
    rows = np.random.default_rng(seed).standard_normal((40, weight.shape[0]))
    rows *= np.logspace(0, 2, weight.shape[0])  # channels of very different scales
    f = factorize(weight, rows.T @ rows, damping=0.0)
    rank = min(rank, len(f.s))
    a, b = factors(f, rank)
    error = np.linalg.norm(rows @ weight - rows @ a @ b)
    expected = np.sqrt(np.sum(f.s[rank:] ** 2))
    assert error == pytest.approx(expected, rel=1e-6, abs=1e-6 * (1 + f.s.sum()))


@pytest.mark.parametrize("shape", [(320, 256), (256, 320)], ids=["tall", "wide"])
@pytest.mark.parametrize("with_data", [False, True], ids=["plain", "whitened"])
def test_large_matrices_through_the_gram_eigendecomposition_match_the_svd(shape, with_data):
    """From ``EIGEN_MIN_DIM`` up, factors come from the eigendecomposition of the smaller Gram
    (without the whitener's Cholesky and solve where W is tall): the truncation error on the
    calibration inputs is the optimum the SVD gives, and the spectrum is the SVD's."""
    assert min(shape) >= lowrank_svd.EIGEN_MIN_DIM
    k, n = shape
    weight = RNG.standard_normal(shape) * np.logspace(0, -3, n)  # a decaying spectrum
    rows = RNG.standard_normal((2 * k, k)) * np.logspace(0, 1, k)
    gram = rows.T @ rows if with_data else None
    f = factorize(weight, gram, damping=1e-4)
    s = lowrank_svd.whitener(gram, 1e-4) if with_data else np.eye(k)
    exact = np.linalg.svd(s @ weight, compute_uv=False)
    np.testing.assert_allclose(f.s[:100], exact[:100], rtol=1e-9)
    assert f.aware == with_data
    for rank in (8, 100, 200):
        a, b = factors(f, rank)
        error = np.linalg.norm(s @ (weight - a @ b))
        assert error == pytest.approx(np.sqrt(np.sum(exact[rank:] ** 2)), rel=1e-7)


@pytest.mark.parametrize("shape", [(320, 256), (256, 320), (64, 48)], ids=["tall", "wide", "small"])
@pytest.mark.parametrize("with_data", [False, True], ids=["plain", "whitened"])
def test_a_float32_weight_factorizes_exactly_as_its_float64_copy(shape, with_data):
    """The factors keep the weight as stored and cast it where used: a pass holding every
    layer's factorization holds no float64 copy of the model (1.2 GB on a 0.6 GB encoder),
    and the factors are bit for bit those of the float64 weight."""
    weight = RNG.standard_normal(shape).astype(np.float32)
    rows = RNG.standard_normal((2 * shape[0], shape[0]))
    gram = rows.T @ rows if with_data else None
    stored = factorize(weight, gram, damping=1e-4)
    copied = factorize(weight.astype(np.float64), gram, damping=1e-4)
    np.testing.assert_array_equal(stored.s, copied.s)
    for rank in (4, 40):
        for ours, theirs in zip(factors(stored, rank), factors(copied, rank), strict=True):
            assert ours.dtype == np.float64
            np.testing.assert_array_equal(ours, theirs)


def test_a_whitened_left_factor_inverts_the_whitener_once_for_every_rank(monkeypatch):
    """S⁻¹U is asked for at many ranks while ranks are chosen: S is inverted on the first
    call only (a solve factorized S on every call: 0.10 s at K = 1024), and each rank's
    columns are S⁻¹U's to rounding."""
    k, n = 64, 96  # wide: the whitened SVD path
    weight = RNG.standard_normal((k, n))
    rows = RNG.standard_normal((2 * k, k)) * np.logspace(0, 1, k)
    gram = rows.T @ rows
    white = lowrank_svd.whitener(gram, 1e-4)
    u = np.linalg.svd(white @ weight, full_matrices=False)[0]
    inversions = []
    inv = np.linalg.inv
    monkeypatch.setattr(np.linalg, "inv", lambda m: inversions.append(m.shape) or inv(m))
    f = factorize(weight, gram, damping=1e-4)
    for rank in (4, 40, 17, 64):
        left = f.left(rank)
        expected = np.linalg.solve(white, u[:, :rank])
        # Singular vectors are unique up to sign: compare column by column, signs aligned.
        signs = np.sign(np.sum(left * expected, axis=0))
        np.testing.assert_allclose(left * signs, expected, rtol=0, atol=1e-10)
    assert inversions == [(k, k)]


def test_undamped_a_singular_gram_gives_plain_svd_whatever_the_shape():
    # Found in review: at damping 0 tall large layers were whitened by a singular Gram while
    # every other shape fell back to plain SVD (the whitener's Cholesky fails).
    rows = RNG.standard_normal((100, 320))  # rank 100 of 320 (and 8 of 16 below)
    for shape in ((320, 256), (320, 400), (16, 8)):
        x = rows[: min(100, shape[0] // 2), : shape[0]]
        weight = RNG.standard_normal(shape)
        f = factorize(weight, x.T @ x, damping=0.0)
        assert not f.aware, shape


def test_refit_never_increases_the_calibration_error_of_a_plain_svd():
    x = RNG.standard_normal((500, 32)) * np.logspace(0, 2, 32)
    weight = RNG.standard_normal((32, 24))
    a, b = factors(factorize(weight), 8)
    b_refit = refit(weight, a, x.T @ x)
    assert np.linalg.norm(x @ (weight - a @ b_refit)) < 0.9 * np.linalg.norm(x @ (weight - a @ b))


def test_whitener_damps_a_rank_deficient_gram():
    x = RNG.standard_normal((100, 16))
    x[:, 8:] = 0.0  # half the channels never fire
    s = whitener(x.T @ x, damping=1e-4)
    assert s is not None and np.all(np.isfinite(s))
    assert whitener(np.zeros((4, 4)), 1e-4) is None


# ---- rewrites ------------------------------------------------------------------------------


def test_rank_r_matmul_weight_is_reproduced_exactly():
    w = _low_rank(64, 96, 8)
    proto = make_model(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [oh.make_tensor_value_info("x", F, [2, 5, 64])],
        [oh.make_tensor_value_info("y", F, [2, 5, 96])],
        {"w": w},
    )
    model, data = _rewrite(proto, LowRankPass(selection="error", max_error=1e-4))
    assert _ops(model) == ["MatMul", "MatMul"]
    assert model.graph.node(1).name == "mm"
    a, b = (model.graph.initializers[f"w_lowrank_{s}"].const_value.numpy() for s in "ab")
    assert a.shape == (64, 8) and b.shape == (8, 96)
    np.testing.assert_allclose(a @ b, w, atol=1e-4 * np.abs(w).max())
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    (y,) = run_ort(data, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)
    assert "w" not in model.graph.initializers


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_trans_b_alpha_beta_and_bias_are_kept(trans_a):
    w = _low_rank(64, 96, 8)  # K x N
    c = RNG.standard_normal(96).astype(np.float32)
    x_shape = [64, 3] if trans_a else [3, 64]
    attrs = {"transA": trans_a, "transB": 1, "alpha": 0.5, "beta": 2.0}
    proto = make_model(
        [oh.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", **attrs)],
        [oh.make_tensor_value_info("x", F, x_shape)],
        [oh.make_tensor_value_info("y", F, [3, 96])],
        {"w": np.ascontiguousarray(w.T), "c": c},
    )
    model, data = _rewrite(proto, LowRankPass(selection="error", max_error=1e-4))
    assert _ops(model) == ["Gemm" if trans_a else "MatMul", "Gemm"]
    x = RNG.standard_normal(x_shape).astype(np.float32)
    (y,) = run_ort(data, {"x": x})
    expected = 0.5 * ((x.T if trans_a else x) @ w) + 2.0 * c
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)


def test_1x1_conv_with_stride_pads_and_bias_is_split_exactly():
    w = _low_rank(64, 96, 8)  # K (in) x N (out)
    bias = RNG.standard_normal(96).astype(np.float32)
    proto = make_model(
        [
            oh.make_node(
                "Conv", ["x", "w", "b"], ["y"], name="pw", strides=[2, 2], pads=[1, 1, 1, 1]
            )
        ],
        [oh.make_tensor_value_info("x", F, [1, 64, 7, 7])],
        [oh.make_tensor_value_info("y", F, [1, 96, 5, 5])],
        {"w": np.ascontiguousarray(w.T.reshape(96, 64, 1, 1)), "b": bias},
    )
    model, data = _rewrite(proto, LowRankPass(selection="error", max_error=1e-4))
    assert _ops(model) == ["Conv", "Conv"]
    x = RNG.standard_normal((1, 64, 7, 7)).astype(np.float32)
    (y,) = run_ort(data, {"x": x})
    (reference,) = run_ort(proto.SerializeToString(), {"x": x})
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-3)


def test_skipped_layers_are_reported_with_their_reason(caplog):
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "small"], ["h"], name="small_mm"),
            oh.make_node("MatMul", ["h", "square"], ["h2"], name="square_mm"),
            oh.make_node("MatMul", ["h2", "shared"], ["h3"], name="shared_1"),
            oh.make_node("MatMul", ["h3", "shared"], ["h4"], name="shared_2"),
            oh.make_node("Conv", ["img", "k3"], ["c"], name="conv3x3"),
            oh.make_node("MatMul", ["h4", "z"], ["y"], name="act_mm"),
        ],
        [
            oh.make_tensor_value_info("x", F, [4, 16]),
            oh.make_tensor_value_info("img", F, [1, 64, 5, 5]),
            oh.make_tensor_value_info("z", F, [128, 2]),
        ],
        [
            oh.make_tensor_value_info("y", F, [4, 2]),
            oh.make_tensor_value_info("c", F, [1, 64, 3, 3]),
        ],
        {
            "small": RNG.standard_normal((16, 128)).astype(np.float32),
            "square": RNG.standard_normal((128, 128)).astype(np.float32),
            "shared": RNG.standard_normal((128, 128)).astype(np.float32),
            "k3": RNG.standard_normal((64, 64, 3, 3)).astype(np.float32),
        },
    )
    lowrank = LowRankPass(selection="energy", energy=0.5, exclude=("square_mm",))
    with caplog.at_level(logging.INFO, logger="onnx_shrink.passes.lowrank"):
        plans = {p.node: p for p in lowrank.plan(io.load(proto))}
        _rewrite(proto, lowrank)
    assert all(p.rank is None for p in plans.values())
    assert "under min_params" in plans["small_mm"].reason
    assert plans["square_mm"].reason == "excluded"
    assert "shared by 2" in plans["shared_1"].reason
    assert "not 1x1" in plans["conv3x3"].reason
    assert plans["act_mm"].reason == "weight is not a constant"
    for name in ("small_mm", "square_mm", "shared_1", "conv3x3"):
        assert any(name in r.message and "dense" in r.message for r in caplog.records)
    assert "0 of 6 layers split" in caplog.text


def test_layer_past_break_even_stays_dense():
    w = RNG.standard_normal((96, 96)).astype(np.float32)  # full rank; break-even 48
    proto = make_model(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [oh.make_tensor_value_info("x", F, [4, 96])],
        [oh.make_tensor_value_info("y", F, [4, 96])],
        {"w": w},
    )
    (plan,) = LowRankPass(selection="energy", energy=0.99).plan(io.load(proto))
    assert plan.rank is None and "break-even 48.0" in plan.reason
    model, _ = _rewrite(proto, LowRankPass(selection="energy", energy=0.99))
    assert _ops(model) == ["MatMul"]


def test_constant_node_weights_are_lifted_and_split():
    w = _low_rank(64, 64, 8)
    proto = make_model(
        [
            oh.make_node("Constant", [], ["w"], value=onh.from_array(w, "w")),
            oh.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 64])],
        [oh.make_tensor_value_info("y", F, [2, 64])],
        {},
    )
    model, _ = _rewrite(proto, LowRankPass(selection="error", max_error=1e-4))
    assert _ops(model) == ["MatMul", "MatMul"]


# ---- rank selection ------------------------------------------------------------------------


def _stack(layers: int, k: int = 96, n: int = 128):
    nodes, inits, prev = [], {}, "x"
    for i in range(layers):
        # singular values decaying at different speeds per layer
        u, _ = np.linalg.qr(RNG.standard_normal((k, k)))
        v, _ = np.linalg.qr(RNG.standard_normal((n, k)))
        w = (u * np.exp(-np.arange(k) / (5.0 + 10 * i))) @ v.T
        inits[f"w{i}"] = w.astype(np.float32)
        nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(oh.make_node("Slice", [f"h{i}", "s0", "s1", "ax"], [f"x{i}"]))
        prev = f"x{i}"
    inits.update(s0=np.array([0], np.int64), s1=np.array([k], np.int64), ax=np.array([1], np.int64))
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, [4, k])],
        [oh.make_tensor_value_info(prev, F, [4, k])],
        inits,
    )


@pytest.mark.parametrize("reduction", [0.2, 0.3, 0.5])
def test_budget_removes_the_asked_share_of_parameters(reduction):
    plans = LowRankPass(reduction=reduction, activation_aware=False).plan(io.load(_stack(4)))
    before = sum(p.params_before for p in plans)
    after = sum(p.params_after for p in plans)
    assert after <= (1 - reduction) * before
    assert after >= (1 - reduction - 0.05) * before  # not wildly over-compressed
    assert all(p.rank is None or p.rank % 8 == 0 for p in plans)
    ranks = [p.rank or 10**6 for p in sorted(plans, key=lambda p: p.node)]
    assert ranks[0] <= ranks[-1]  # the fastest-decaying layer gives up the most rank


def test_energy_rank_keeps_the_asked_energy():
    (plan, *_) = LowRankPass(selection="energy", energy=0.9, activation_aware=False).plan(
        io.load(_stack(1))
    )
    assert plan.rank is not None and plan.error <= np.sqrt(0.1) + 1e-9


def test_data_free_mode_requests_no_statistics():
    proto = _stack(2)
    assert LowRankPass(activation_aware=False).requests(io.load(proto)) == []
    assert LowRankPass().requests(io.load(proto)) == [
        StatRequest("x", "gram"),
        StatRequest("x0", "gram"),
    ]


def test_activation_aware_halves_the_output_error_of_plain_svd():
    k, n = 64, 96
    w = RNG.standard_normal((k, n)).astype(np.float32)
    proto = make_model(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [oh.make_tensor_value_info("x", F, [None, k])],
        [oh.make_tensor_value_info("y", F, [None, n])],
        {"w": w},
    )
    mix = RNG.standard_normal((k, k)) * np.logspace(0, -2, k)  # correlated, anisotropic inputs
    calib, evaluation = RNG.standard_normal((2, 2000, k)) @ mix
    stats = Statistics({StatRequest("x", "gram"): Gram(calib.T @ calib, 2000)}, 2000, "test")
    errors = {}
    for aware in (False, True):
        _, data = _rewrite(proto, LowRankPass(reduction=0.5, activation_aware=aware), stats)
        x = evaluation.astype(np.float32)
        (y,) = run_ort(data, {"x": x})
        errors[aware] = np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
    assert errors[True] <= 0.5 * errors[False]


def test_conv_activation_aware_uses_channel_energies():
    w = RNG.standard_normal((96, 64, 1, 1)).astype(np.float32)
    proto = make_model(
        [oh.make_node("Conv", ["x", "w"], ["y"], name="pw")],
        [oh.make_tensor_value_info("x", F, [1, 64, 4, 4])],
        [oh.make_tensor_value_info("y", F, [1, 96, 4, 4])],
        {"w": w},
    )
    lowrank = LowRankPass(selection="energy", energy=0.5)
    (request,) = lowrank.requests(io.load(proto))
    assert request == StatRequest("x", "channel_sqnorm", axis=1)
    stats = Statistics({request: ChannelValues(np.logspace(0, 4, 64), 16)}, 1, "test")
    (plan,) = lowrank.plan(io.load(proto), stats)
    assert plan.activation_aware and plan.rank is not None


def test_options_are_checked():
    with pytest.raises(ValueError, match="energy"):
        LowRankPass(energy=1.5)
    with pytest.raises(ValueError, match="op_types"):
        LowRankPass(op_types=("Add",))
    with pytest.raises(ValueError, match="selection"):
        LowRankPass(selection="random")


# ---- through shrink() ----------------------------------------------------------------------


def _stack_files(tmp_path, samples: int):
    """A two-layer stack saved as a file, and ``samples`` calibration inputs beside it."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_stack(2).SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.standard_normal((samples, 96)).astype(np.float32))
    return path, calib


def test_the_trials_output_error_is_timed_apart_from_the_calibration(tmp_path):
    """A captcha CRNN's lowrank row read "calibrated on 48 samples in 44.0s", where most of
    the 44 s measured the output error of candidate ranks on those samples."""
    from onnx_shrink import console

    path, calib = _stack_files(tmp_path, 64)
    result = shrink(path, "lowrank", calibration=calib, check=False)
    step = result.steps[-1]
    assert step.probes > 0 and step.probe_seconds > 0 and step.calibration_seconds > 0
    assert result.to_dict()["passes"][-1]["probes"] == step.probes
    row = str(console.summary_table(result).columns[0]._cells[0]).replace("\\[", "[")
    assert row.startswith(
        f"lowrank [calibrated on {step.calibration_samples} samples in "
        f"{step.calibration_seconds:.1f}s; output error of {step.probes} trials in "
        f"{step.probe_seconds:.1f}s]"
    )
    energy = shrink(
        path, "lowrank", sets=["lowrank.selection=energy"], calibration=calib, check=False
    )
    assert energy.steps[-1].probes == 0 and energy.steps[-1].probe_seconds == 0


def test_shrink_with_calibration_then_quant_quantizes_both_factors(tmp_path):
    path, calib = _stack_files(tmp_path, 32)
    result = shrink(
        path,
        [FoldPass(), LowRankPass(selection="energy", energy=0.99), QuantPass(calibration="minmax")],
        calibration=calib,
        check=False,
    )
    dq_weights = {n.inputs[0].name for n in result.model.graph if n.op_type == "DequantizeLinear"}
    for i in range(2):
        assert {f"w{i}_lowrank_a_quantized", f"w{i}_lowrank_b_quantized"} <= dq_weights


def _outlier_stats(proto, k: int = 96):
    """Grams for ``_stack``: layer 1's input lives in 4 directions (its output error there is
    tiny at any rank >= 4), layer 0's input is isotropic."""
    lowrank = LowRankPass()
    first, second = lowrank.requests(io.load(proto))
    narrow = np.zeros((k, k))
    narrow[:4, :4] = np.eye(4) * 1e3
    return Statistics({first: Gram(np.eye(k), 100), second: Gram(narrow, 100)}, 100, "test")


def test_budget_on_weight_error_gives_plain_svd_ranks_and_equal_parameters():
    proto = _stack(2)
    stats = _outlier_stats(proto)
    plain = LowRankPass(reduction=0.4, activation_aware=False).plan(io.load(proto))
    aware = LowRankPass(reduction=0.4).plan(io.load(proto), stats)
    assert [p.rank for p in aware] == [p.rank for p in plain]
    assert all(p.activation_aware for p in aware if p.rank is not None)


def test_budget_on_output_error_cuts_the_layer_whose_output_error_is_cheap():
    proto = _stack(2)
    stats = _outlier_stats(proto)
    by_weight = {p.node: p.rank for p in LowRankPass(reduction=0.4).plan(io.load(proto), stats)}
    by_output = {
        p.node: p.rank
        for p in LowRankPass(reduction=0.4, budget_metric="output").plan(io.load(proto), stats)
    }
    assert by_output["mm1"] is not None and by_output["mm1"] < (by_weight["mm1"] or 10**6)


# ---- budget on the model's output error (measured probes) ----------------------------------


def _isotropic_stats(proto, k: int = 96):
    requests = LowRankPass().requests(io.load(proto))
    return Statistics({r: Gram(np.eye(k) * 100, 100) for r in requests}, 100, "test")


def _measured(proto, stats, scale: dict[str, float]):
    """Probe errors as the model would report them: each layer's own whitened (here: weight)
    curve times ``scale[layer]``, the layer's gain to the model's output."""
    lowrank = LowRankPass(budget_metric="model-output")
    probes = lowrank.probes(io.load(proto), stats)
    model = io.load(proto)
    weights = {n.name: n.inputs[1].const_value.numpy().astype(np.float64) for n in model.graph}
    errors = {}
    for probe in probes:
        name, rank = probe.key.removeprefix("lowrank:").split("@")
        tail = factorize(weights[name]).tail_energy()
        errors[probe.key] = scale[name] * tail[int(rank)] / tail[0]
    return dataclasses.replace(stats, probe_errors=errors)


def test_model_output_probes_measure_each_layer_at_a_geometric_grid_of_ranks():
    proto = _stack(2)
    stats = _isotropic_stats(proto)
    probes = LowRankPass(budget_metric="model-output", probe_ranks=4).probes(io.load(proto), stats)
    keys = [p.key for p in probes]
    assert keys == [f"lowrank:mm{i}@{r}" for i in range(2) for r in (8, 16, 24, 48)]
    assert LowRankPass(budget_metric="weight").probes(io.load(proto), stats) == []
    model = io.load(proto)
    probes[0].edit(model)  # the edit splits mm0 at rank 8 in the model it is given
    assert [n.op_type for n in model.graph][:2] == ["MatMul", "MatMul"]
    assert model.graph.initializers["w0_lowrank_a"].const_value.shape == (96, 8)


@pytest.mark.parametrize("unnamed", ["", None])
def test_unnamed_layers_are_probed_by_the_value_they_compute(unnamed, caplog):
    """Found in an audit (CenterFace, a torch 1.2 export): every layer of a model with unnamed
    nodes was skipped ("None has no unique name") and the budget quietly fell back to the
    weight error. Such layers are now known by their output; the edit finds them so."""
    proto = _stack(2)
    stats = _isotropic_stats(proto)
    model = io.load(proto)
    for node in model.graph:
        node.name = unnamed
    with caplog.at_level(logging.WARNING):
        probes = LowRankPass(probe_ranks=4, held_out=False).probes(model, stats)
    assert [p.key for p in probes] == [
        f"lowrank:h{i}@{r}" for i in range(2) for r in (8, 16, 24, 48)
    ]
    assert all(p.nodes == () for p in probes) and not caplog.text
    copy = model.clone()
    probes[4].edit(copy)  # layer 1 at rank 8
    assert copy.graph.initializers["w1_lowrank_a"].const_value.shape == (96, 8)
    measured = _measured(proto, stats, {"mm0": 1.0, "mm1": 100.0})
    by_output = {k.replace("mm", "h"): v for k, v in measured.probe_errors.items()}
    with caplog.at_level(logging.WARNING):
        plans = LowRankPass(reduction=0.4).plan(
            model, dataclasses.replace(stats, probe_errors=by_output)
        )
    named = LowRankPass(reduction=0.4).plan(io.load(proto), measured)
    assert [p.rank for p in plans] == [p.rank for p in named]
    assert "no model-output measurements" not in caplog.text


def test_held_out_probes_remake_their_edit_from_other_statistics():
    proto = _stack(2)
    stats = _isotropic_stats(proto)
    probes = LowRankPass(probe_ranks=2).probes(io.load(proto), stats)  # held_out by default
    requests = LowRankPass().requests(io.load(proto))
    assert [p.requests for p in probes] == [(requests[0],)] * 2 + [(requests[1],)] * 2
    for probe in probes:  # remade from the same statistics: the same factors as ``edit``
        by_edit, remade = io.load(proto), io.load(proto)
        probe.edit(by_edit)
        probe.remade(stats)(remade)
        for name, value in by_edit.graph.initializers.items():
            np.testing.assert_array_equal(
                value.const_value.numpy(), remade.graph.initializers[name].const_value.numpy()
            )
    other = dataclasses.replace(
        stats, results={r: Gram(np.diag(np.arange(1.0, 97)), 100) for r in requests}
    )
    by_edit, remade = io.load(proto), io.load(proto)
    probes[0].edit(by_edit)
    probes[0].remade(other)(remade)
    a, b = (m.graph.initializers["w0_lowrank_a"].const_value.numpy() for m in (by_edit, remade))
    assert a.shape == b.shape and not np.allclose(a, b)  # made from the statistics it is given
    in_sample = LowRankPass(probe_ranks=2, held_out=False).probes(io.load(proto), stats)
    assert [p.key for p in in_sample] == [p.key for p in probes]
    assert all(p.remade is None and not p.requests for p in in_sample)


def test_a_single_layer_is_not_probed_its_rank_is_the_budgets(caplog):
    proto = _stack(1)
    stats = _isotropic_stats(proto)
    assert LowRankPass().probes(io.load(proto), stats) == []
    with caplog.at_level(logging.WARNING):
        (plan,) = LowRankPass(reduction=0.4).plan(io.load(proto), stats)
    assert "no model-output measurements" not in caplog.text
    (plain,) = LowRankPass(reduction=0.4, activation_aware=False).plan(io.load(proto))
    assert plan.rank == plain.rank


def test_model_output_budget_gives_more_rank_to_the_layer_that_moves_the_output_most():
    proto = _stack(2)
    stats = _isotropic_stats(proto)
    lowrank = LowRankPass(reduction=0.4, budget_metric="model-output")
    ranks = {}
    for loud in ("mm0", "mm1"):
        measured = _measured(proto, stats, {"mm0": 1.0, "mm1": 1.0, loud: 100.0})
        plans = lowrank.plan(io.load(proto), measured)
        before, after = sum(p.params_before for p in plans), sum(p.params_after for p in plans)
        assert 0.55 * before <= after <= 0.6 * before  # the same budget either way
        ranks[loud] = {p.node: p.rank or 10**6 for p in plans}
    assert ranks["mm0"]["mm0"] > ranks["mm1"]["mm0"]
    assert ranks["mm1"]["mm1"] > ranks["mm0"]["mm1"]


def test_model_output_budget_without_measurements_falls_back_to_weight_error(caplog):
    proto = _stack(2)
    stats = _isotropic_stats(proto)
    with caplog.at_level(logging.WARNING):
        plans = LowRankPass().plan(io.load(proto), stats)  # model-output, the default
    assert "no model-output measurements" in caplog.text
    plain = LowRankPass(activation_aware=False).plan(io.load(proto))
    assert [p.rank for p in plans] == [p.rank for p in plain]


def test_shrink_measures_the_model_output_probes_on_calibration_data(tmp_path):
    path, calib = _stack_files(tmp_path, 16)
    lowrank = LowRankPass(reduction=0.3, budget_metric="model-output", probe_ranks=3)
    result = shrink(path, [lowrank], calibration=calib, check=False)
    (step,) = result.steps
    assert step.modified and step.after.params <= 0.7 * step.before.params


def test_probe_seconds_bounds_the_measurements_and_says_so(tmp_path, caplog):
    # 0 s: the first run's projection is past it. Its 16 probes (layers 0-4 whole, layer 5's
    # lowest rank) are kept, and of the rest layer 5's middle rank: each held-out block
    # measures those 17 of 18.
    path, calib = _stack_files(tmp_path, 16)
    path.write_bytes(_stack(6).SerializeToString())
    with caplog.at_level(logging.WARNING):
        result = shrink(
            path,
            "lowrank",
            sets=["lowrank.reduction=0.3", "lowrank.probe_ranks=3", "lowrank.probe_seconds=0"],
            calibration=calib,
            check=False,
        )
    assert "lowrank: measured 17 of 18 probes within its 0 s" in caplog.text
    assert "raise lowrank.probe_seconds to measure them" in caplog.text
    assert "no measured curve" not in caplog.text
    (step,) = result.steps
    assert step.modified and step.after.params <= 0.7 * step.before.params


@pytest.mark.parametrize(
    "options",
    [{"energy": 0.5}, {"selection": "energy", "reduction": 0.5}, {"max_error": 0.2}],
)
def test_an_option_the_selection_does_not_read_is_refused(options):
    with pytest.raises(ValueError, match="does not read it"):
        LowRankPass(**options)


def test_splitting_a_pruned_weight_warns_that_its_zeros_are_lost(caplog):
    from models import digits

    with caplog.at_level(logging.WARNING):
        shrink(
            digits.MODEL_PATH,
            "fold,prune,lowrank",
            sets=["prune.sparsity=0.8", "lowrank.activation_aware=false"],
            check=False,
        )
    assert "were mostly zeros, and their factors are dense" in caplog.text
    assert "where prune made the zeros, put prune after lowrank" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        shrink(
            digits.MODEL_PATH, "fold,lowrank", sets=["lowrank.activation_aware=false"], check=False
        )
    assert "mostly zeros" not in caplog.text


def test_a_run_that_splits_nothing_says_why_in_one_warning(caplog):
    """ "(no change)" in the summary said nothing of why; each layer's reason is INFO (-v)."""
    weight = RNG.standard_normal((4, 4)).astype(np.float32)  # too small to save anything
    f = onnx.TensorProto.FLOAT
    proto = make_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        [onnx.helper.make_tensor_value_info("x", f, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", f, [1, 4])],
        {"w": weight},
    )
    with caplog.at_level(logging.WARNING):
        result = shrink(proto, "lowrank", check=False)
    assert not result.steps[0].modified
    (record,) = [r for r in caplog.records if "no layer changed" in r.getMessage()]
    assert record.getMessage().startswith("lowrank: no layer changed (weight 4x4 is under")
    caplog.clear()
    relu = make_model(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        [onnx.helper.make_tensor_value_info("x", f, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", f, [1, 4])],
        {},
    )
    with caplog.at_level(logging.WARNING):
        shrink(relu, "lowrank", check=False)
    assert "lowrank: no layer changed (no MatMul/Gemm/Conv in the main graph)" in caplog.text


def test_layers_fit_to_fewer_rows_than_inputs_are_one_warning(caplog):
    """MTCNN's onet: 64 calibration crops for a 1152-wide Gemm; lowrank's check on those crops
    read error 4.5e-6, on others 0.062, and nothing said the fit had too few rows."""
    import types

    from onnx_shrink.passes import lowrank_report

    def layer(name, k, rows):
        node = types.SimpleNamespace(name=name)
        return types.SimpleNamespace(node=node, shape=(k, 16), gram_rows=rows)

    with caplog.at_level(logging.WARNING):
        lowrank_report.warn_few_rows([layer("wide", 1152, 64), layer("narrow", 32, 64)])
    (record,) = caplog.records
    assert "1 layer(s) saw fewer calibration rows" in record.getMessage()
    assert "wide (64 < 1152)" in record.getMessage()


def test_a_filterbank_feeding_a_log_stays_dense_unless_asked(caplog):
    """onnx-asr's NeMo front end: lowrank split its non-negative mel filterbank, the factors
    made energies negative, and the Log gave NaN for 80% of the features."""
    rng = np.random.default_rng(43)
    bank = np.zeros((128, 64), np.float32)  # triangles two bins apart, as mel filters are
    for j in range(64):
        bank[2 * j : 2 * j + 4, j] = [0.5, 1.0, 1.0, 0.5][: 128 - 2 * j]
    proto = make_model(
        [
            oh.make_node("Abs", ["x"], ["power"]),
            oh.make_node("MatMul", ["power", "bank"], ["mel"], name="filterbank"),
            oh.make_node("Log", ["mel"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 128])],
        [oh.make_tensor_value_info("y", F, ["N", 64])],
        {"bank": bank},
    )
    # Power spectra spanning decades: a quiet band's energy is far below a loud one's.
    calibration = {"x": np.exp(3 * rng.standard_normal((64, 128))).astype(np.float32)}
    with caplog.at_level(logging.WARNING):
        kept = shrink(proto, "lowrank", calibration=calibration, check=False)
    assert not kept.steps[0].modified
    assert "reaches a Log through linear ops" in caplog.text
    split = shrink(proto, [LowRankPass(log_inputs=True)], calibration=calibration, check=False)
    assert split.steps[0].modified
    (out,) = run_ort(io.to_bytes(split.model), {"x": calibration["x"][:8]})
    assert np.isnan(out).any()  # what the default spares the user
