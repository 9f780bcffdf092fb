"""The ``prune`` pass and ``reconstruct.refit``: sparsity reached exactly, N:M patterns, numerics
against numpy, real savings on disk, data requests, and fidelity on MiniLM and digits."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from models import builders, digits
from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import ChannelValues, Gram, Statistics, StatRequest
from onnx_shrink.passes import reconstruct
from onnx_shrink.passes.prune import PrunePass, sparse_break_even
from onnx_shrink.passes.prune_masks import magnitude_keep, nm_keep, row_keep
from tests.helpers import make_model, run_ort


def _out(name: str, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [f"{name}{i}" for i in range(rank)]
    )


def _model(nodes, inputs, outputs, weights, opset: int = 17, ir_version: int = 8) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [_out(n, rank) for n, rank in outputs],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version
    return io.load(proto)


def _matmul(w: np.ndarray) -> ir.Model:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return _model([node], [("x", ["b", w.shape[0]])], [("y", 2)], {"w": w})


def _conv(w: np.ndarray, group: int = 1) -> ir.Model:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1])
    return _model([node], [("x", [1, w.shape[1] * group, 5, 5])], [("y", 4)], {"w": w})


def _weight(model: ir.Model, name: str = "w") -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _stats(entries: dict[StatRequest, object]) -> Statistics:
    return Statistics(results=entries, samples=1, source="test")


# ---- masks and target sparsity -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=200),
    st.floats(0.0, 1.0),
)
def test_magnitude_zeroes_exactly_the_target_count_with_ties(values, sparsity):
    scores = np.abs(np.asarray(values, np.float64))
    keep = magnitude_keep(scores, sparsity)
    assert (~keep).sum() == round(sparsity * scores.size)
    # Every dropped score is <= every kept one: ties are split, never over- or under-pruned.
    if keep.any() and (~keep).any():
        assert scores[~keep].max() <= scores[keep].min()
    # Ties go in flat order, exactly as a stable sort drops them (the mask is selected, not
    # sorted, for speed).
    stable = np.ones(scores.size, bool)
    stable[np.argsort(scores, kind="stable")[: round(sparsity * scores.size)]] = False
    assert (keep == stable).all()


@settings(max_examples=25, deadline=None)
# sparsity=1 is refused (it zeroes every weight): drawn from [0, 1).
@given(
    st.integers(1, 6),
    st.integers(1, 8),
    st.floats(0.0, 1.0, exclude_max=True),
    st.integers(0, 2**31),
)
def test_prune_reaches_its_sparsity_on_every_layer(k_groups, n, sparsity, seed):
    rng = np.random.default_rng(seed)
    w1 = rng.integers(-2, 3, size=(k_groups * 4, n)).astype(np.float32)  # many ties and zeros
    w2 = rng.normal(size=(n, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="b"),
    ]
    model = _model(nodes, [("x", [1, k_groups * 4])], [("y", 2)], {"w1": w1, "w2": w2})
    PrunePass(sparsity=sparsity, min_elements=0)(model)
    for name, original in (("w1", w1), ("w2", w2)):
        zeros = int((_weight(model, name) == 0).sum())
        assert zeros == max(round(sparsity * original.size), int((original == 0).sum()))
        kept = _weight(model, name) != 0
        np.testing.assert_array_equal(_weight(model, name)[kept], original[kept])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([(1, 4), (2, 4), (2, 8), (3, 4)]))
def test_nm_keeps_at_most_n_of_every_m_along_the_reduction_axis(groups, width, nm):
    n, m = nm
    rng = np.random.default_rng(groups * 31 + width)
    w = rng.normal(size=(groups * m, width)).astype(np.float32)
    model = _matmul(w)
    PrunePass(nm=f"{n}:{m}", min_elements=0)(model)
    per_group = (_weight(model).reshape(groups, m, width) != 0).sum(axis=1)
    assert per_group.max() <= n and (per_group == n).all()  # distinct values: exactly n


def test_nm_on_conv_groups_input_channels_at_each_kernel_position():
    w = np.random.default_rng(0).normal(size=(6, 8, 3, 3)).astype(np.float32)
    model = _conv(w)
    PrunePass(nm="2:4", min_elements=0)(model)
    nonzero = _weight(model).reshape(6, 2, 4, 3, 3) != 0  # [M, C/4, 4, kh, kw]
    assert (nonzero.sum(axis=2) == 2).all()


def test_nm_skips_a_layer_whose_reduction_length_is_not_a_multiple_of_m(caplog):
    w = np.ones((6, 4), np.float32)
    model = _matmul(w)
    with caplog.at_level(logging.INFO):
        assert not PrunePass(nm="2:4", min_elements=0)(model).modified
    assert "not a multiple of 4" in caplog.text


# ---- numerics against numpy ----------------------------------------------------------------


def _numpy_magnitude(w: np.ndarray, sparsity: float) -> np.ndarray:
    threshold = np.sort(np.abs(w).ravel())[round(sparsity * w.size) - 1]
    return np.where(np.abs(w) > threshold, w, 0).astype(w.dtype)


def test_pruned_matmul_gemm_and_conv_compute_with_the_numpy_pruned_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    model = _matmul(w)
    PrunePass(min_elements=0)(model)
    (y,) = run_ort(io.to_bytes(model), {"x": x})
    np.testing.assert_allclose(y, x @ _numpy_magnitude(w, 0.5), rtol=1e-5, atol=1e-5)

    bt = rng.normal(size=(8, 16)).astype(np.float32)  # Gemm transB=1: [N, K]
    gemm = helper.make_node("Gemm", ["x", "b"], ["y"], name="gemm", transB=1)
    model = _model([gemm], [("x", ["n", 16])], [("y", 2)], {"b": bt})
    PrunePass(min_elements=0, sparsity=0.75)(model)
    (y,) = run_ort(io.to_bytes(model), {"x": x})
    np.testing.assert_allclose(y, x @ _numpy_magnitude(bt, 0.75).T, rtol=1e-5, atol=1e-5)

    wc = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    xc = rng.normal(size=(1, 2, 5, 5)).astype(np.float32)
    model = _conv(wc)
    PrunePass(min_elements=0)(model)
    expected = _numpy_magnitude(wc, 0.5)
    np.testing.assert_array_equal(_weight(model), expected)
    (y,) = run_ort(io.to_bytes(model), {"x": xc})
    np.testing.assert_allclose(y, _conv_numpy(xc, expected), rtol=1e-4, atol=1e-5)


def _conv_numpy(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Stride-1 Conv with one pixel of zero padding."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), np.float64)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            patch = padded[:, :, i : i + x.shape[2], j : j + x.shape[3]]
            out += np.einsum("bchw,mc->bmhw", patch, w[:, :, i, j])
    return out


def test_wanda_keeps_weights_of_a_loud_input_channel():
    w = np.full((8, 4), 1.0, np.float32)
    w[0] = 0.1  # small weights on channel 0, whose activations are 100x louder
    model = _matmul(w)
    pass_ = PrunePass(method="wanda", min_elements=0, reconstruct="off")
    assert pass_.requests(model) == [StatRequest("x", "channel_sqnorm", axis=-1)]
    norms = np.ones(8)
    norms[0] = 1e4
    pass_.bind(_stats({StatRequest("x", "channel_sqnorm", -1): ChannelValues(norms, 10)}))(model)
    assert (_weight(model)[0] != 0).all()
    assert (_weight(model) == 0).sum(axis=0).tolist() == [4, 4, 4, 4]  # half of each output


# ---- what gets pruned ----------------------------------------------------------------------


def test_data_free_methods_ask_for_no_data_and_refit_asks_for_the_gram():
    model = _matmul(np.ones((8, 4), np.float32))
    assert PrunePass(min_elements=0).requests(model) == []
    assert PrunePass(nm="2:4", min_elements=0).requests(model) == []
    assert PrunePass(min_elements=0, reconstruct="on").requests(model) == [StatRequest("x", "gram")]


def test_prune_shrinks_a_shared_weight_once_and_sums_its_statistics():
    w = np.random.default_rng(2).normal(size=(8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
    ]
    model = _model(nodes, [("x", [1, 8])], [("y", 2)], {"w": w})
    pass_ = PrunePass(min_elements=0, method="wanda")
    assert {r.tensor for r in pass_.requests(model)} == {"x", "h"}
    grams = {StatRequest(t, "gram"): Gram(np.eye(8), 4) for t in ("x", "h")}
    norms = {StatRequest(t, "channel_sqnorm", -1): ChannelValues(np.ones(8), 4) for t in "xh"}
    pass_.bind(_stats({**grams, **norms}))(model)
    assert len(model.graph.initializers) == 1
    assert (_weight(model) == 0).sum() == 32


def test_prune_keeps_a_weight_another_op_also_reads():
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "w"], ["y"], name="add"),
    ]
    model = _model(nodes, [("x", [4, 4])], [("y", 2)], {"w": w})
    assert not PrunePass(min_elements=0)(model).modified


def test_prune_honours_exclusions_and_min_elements():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="encoder/q"),
        helper.make_node("Gemm", ["h", "w2"], ["y"], name="head"),
    ]
    weights = {"w1": rng.normal(size=(8, 8)), "w2": rng.normal(size=(8, 40))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}

    def zeros(**options) -> tuple[int, int]:
        model = _model(nodes, [("x", [1, 8])], [("y", 2)], weights)
        PrunePass(**options)(model)
        return int((_weight(model, "w1") == 0).sum()), int((_weight(model, "w2") == 0).sum())

    assert zeros(min_elements=0) == (32, 160)
    assert zeros(min_elements=100) == (0, 160)
    assert zeros(min_elements=0, exclude=("encoder/.*",)) == (0, 160)
    assert zeros(min_elements=0, exclude=("w2",)) == (32, 0)
    assert zeros(min_elements=0, exclude_op_types=("Gemm",)) == (32, 0)


def test_prune_lifts_constant_weights_and_prunes_if_bodies(caplog):
    w = np.random.default_rng(4).normal(size=(8, 8)).astype(np.float32)
    const = helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w, "wc"))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wb"], ["yb"], name="body_mm")],
        "body",
        [],
        [_out("yb", 2)],
        [numpy_helper.from_array(w, "wb")],
    )
    nodes = [
        const,
        helper.make_node("MatMul", ["x", "wc"], ["h"], name="mm"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=body),
    ]
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            ],
            [_out(n, 2) for n in ("h", "y")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    proto.ir_version = 8
    model = io.load(proto)
    pass_ = PrunePass(min_elements=0, method="wanda", reconstruct="off")
    requests = pass_.requests(model)
    assert {r.tensor for r in requests} == {"x"}  # the body layer gets no statistics
    with caplog.at_level(logging.INFO):
        stats = _stats({requests[0]: ChannelValues(np.ones(8), 1)})
        pass_.bind(stats)(model)
    assert "in a subgraph, magnitude instead of wanda" in caplog.text
    assert (model.graph.initializers["wc"].const_value.numpy() == 0).sum() == 32
    for graph in model.graphs():
        for value in graph.initializers.values():
            assert (value.const_value.numpy() == 0).sum() == 32, value.name
    feed = {"x": np.ones((1, 8), np.float32), "cond": np.array(True)}
    run_ort(io.to_bytes(model), feed)


@pytest.mark.parametrize(
    "options",
    [
        {"nm": "4:4"},
        {"nm": "2-4"},
        {"nm": "2:4", "scope": "global"},
        {"scope": "global", "method": "wanda"},
    ],
)
def test_prune_rejects_inconsistent_options(options):
    with pytest.raises(ValueError):
        PrunePass(**options)


# ---- savings that are real -----------------------------------------------------------------


@pytest.mark.parametrize(
    "proto",
    [builders.build_cnn(), builders.build_transformer_block(), onnx.load(digits.MODEL_PATH)],
    ids=["cnn", "transformer", "digits"],
)
@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"nm": "2:4"}], ids=["50%", "2:4"])
def test_pruned_file_is_never_larger_and_smaller_zipped(proto, options, tmp_path: Path):
    """Against the input file itself, through the command a user runs."""
    source = tmp_path / "in.onnx"
    source.write_bytes(proto.SerializeToString())
    result = shrink(
        str(source), [PrunePass(**options)], output=str(tmp_path / "out.onnx"), check=False
    )
    unpruned, pruned = source.read_bytes(), result.output_path.read_bytes()
    assert result.output_bytes == len(pruned) <= len(unpruned) == result.input_bytes
    assert len(zlib.compress(pruned)) < 0.95 * len(zlib.compress(unpruned))


def test_sparse_storage_breaks_even_at_two_thirds_for_float32():
    assert sparse_break_even(4) == pytest.approx(2 / 3)
    assert sparse_break_even(2) == pytest.approx(0.8)


# ---- least-squares refit -------------------------------------------------------------------


def assert_least_squares_rows(x, rows, keep, refit, which) -> None:
    """Each of rows ``which`` of ``refit`` is the least-squares fit of the original row's
    outputs on ``x`` from its kept inputs alone, zero elsewhere."""
    for j in which:
        s = keep[j]
        expected, *_ = np.linalg.lstsq(x[:, s], x @ rows[j], rcond=None)
        np.testing.assert_allclose(refit[j, s], expected, rtol=1e-5, atol=1e-6)
        assert (refit[j, ~s] == 0).all()


def test_refit_is_the_least_squares_solution_per_output():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))  # correlated inputs
    rows = rng.normal(size=(5, 12))
    keep = nm_keep(np.abs(rows), 2, 4)
    gram = x.T @ x
    refit = reconstruct.refit(rows, keep, gram, ridge=0.0)
    assert_least_squares_rows(x, rows, keep, refit, range(5))
    pruned = np.where(keep, rows, 0)
    assert reconstruct.output_error(rows, refit, gram) < reconstruct.output_error(
        rows, pruned, gram
    )


def test_refit_rows_sharing_their_kept_inputs_get_the_per_row_solution():
    # Channel pruning: most rows keep the same inputs (one shared system), one row keeps
    # others and one keeps nothing; each row is still its own least-squares solution.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10))
    rows = rng.normal(size=(6, 10))
    keep = np.zeros((6, 10), bool)
    keep[:4, [0, 2, 3, 7, 9]] = True
    keep[4, [1, 5]] = True
    refit = reconstruct.refit(rows, keep, x.T @ x, ridge=0.0)
    assert_least_squares_rows(x, rows, keep, refit, range(5))
    assert (refit[5] == 0).all()


def test_rows_keeping_many_inputs_are_refit_iteratively_to_the_direct_solution(monkeypatch, caplog):
    # Unstructured 50% of 300 inputs: every row keeps 150 of its own. Conjugate gradients
    # (forced here; by cost they take layers of ~1000 inputs and more) refit them all at once.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1200, 300)) @ rng.normal(size=(300, 300)) * np.exp(rng.normal(size=300))
    rows = rng.normal(size=(40, 300))
    keep = row_keep(np.abs(rows) * np.linalg.norm(x, axis=0), 0.5)
    gram = x.T @ x
    direct = reconstruct.refit(rows, keep, gram)
    monkeypatch.setattr(reconstruct, "ITERATIVE_BREAK_EVEN", 0.0)
    with caplog.at_level(logging.DEBUG, logger="onnx_shrink.passes.reconstruct"):
        iterative = reconstruct.refit(rows, keep, gram)
    assert "40 rows of 300 inputs" in caplog.text and "conjugate-gradient" in caplog.text
    assert (iterative[~keep] == 0).all()
    error = reconstruct.output_error(rows, iterative, gram)
    assert error == pytest.approx(reconstruct.output_error(rows, direct, gram), rel=1e-5)
    assert error < 0.8 * reconstruct.output_error(rows, np.where(keep, rows, 0), gram)
    np.testing.assert_allclose(iterative, direct, atol=1e-3 * np.abs(direct).max())


@pytest.mark.parametrize("solver", ["direct", "iterative", "shared"])
def test_a_refit_reads_its_error_off_the_solve(monkeypatch, solver):
    # w.t - v.t - damp |v|^2 - v.r: the energy and the refit rows' output error without the
    # two products output_energy and output_error cost.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(600, 200)) @ rng.normal(size=(200, 200)) * np.exp(rng.normal(size=200))
    rows, gram = rng.normal(size=(30, 200)), x.T @ x
    keep = row_keep(np.abs(rows), 0.5)
    if solver == "shared":
        keep = np.ones_like(keep)
        keep[:, ::7] = False
    if solver == "iterative":
        monkeypatch.setattr(reconstruct, "ITERATIVE_BREAK_EVEN", 0.0)
    refitted = reconstruct.refit_measured(rows, keep, gram)
    assert refitted.energy == pytest.approx(reconstruct.output_energy(rows, gram), rel=1e-12)
    expected = reconstruct.output_error(rows, refitted.rows, gram)
    assert refitted.error == pytest.approx(expected, rel=1e-9)
    assert refitted.error < reconstruct.output_error(rows, np.where(keep, rows, 0), gram)


def test_rows_conjugate_gradients_leave_unconverged_are_solved_directly(monkeypatch):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(400, 120)) @ rng.normal(size=(120, 120))
    rows, gram = rng.normal(size=(10, 120)), x.T @ x
    keep = row_keep(np.abs(rows), 0.5)
    direct = reconstruct.refit_measured(rows, keep, gram)
    monkeypatch.setattr(reconstruct, "ITERATIVE_BREAK_EVEN", 0.0)
    monkeypatch.setattr(reconstruct, "ITERATIVE_MAX_ITERATIONS", 1)
    stalled = reconstruct.refit_measured(rows, keep, gram)
    np.testing.assert_allclose(stalled.rows, direct.rows, rtol=1e-9, atol=1e-12)
    assert stalled.error == pytest.approx(direct.error, rel=1e-9)


def test_a_refit_without_ridge_damps_relative_to_the_gram(monkeypatch):
    # Found in review: ridge=0 damped by an absolute 1e-8, nothing against a rank-deficient
    # Gram of large scale; conjugate gradients ran 1000 iterations and stopped far off.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 200)) * 1e3  # 50 rows: rank 50 of 200
    rows, gram = rng.standard_normal((30, 200)), x.T @ x
    keep = rng.random((30, 200)) < 0.95
    monkeypatch.setattr(reconstruct, "ITERATIVE_BREAK_EVEN", 0.0)
    refitted = reconstruct.refit_measured(rows, keep, gram, ridge=0.0)
    assert refitted.error < 1e-9  # 190 kept inputs reproduce 50 rows exactly


def test_conjugate_gradients_take_the_layers_where_direct_solves_cost_more():
    # MiniLM's 384-wide layers at 50% solve directly; a 1536-wide one and an encoder's
    # 4096 -> 1024 (an hour of direct solves) go to conjugate gradients.
    assert not reconstruct._iterative_pays(np.full(384, 192), 384)
    assert reconstruct._iterative_pays(np.full(384, 768), 1536)
    assert reconstruct._iterative_pays(np.full(1024, 2048), 4096)


def test_output_error_is_the_relative_error_on_the_rows():
    rng = np.random.default_rng(8)
    x, rows = rng.normal(size=(50, 6)), rng.normal(size=(3, 6))
    candidate = rows + rng.normal(scale=0.1, size=rows.shape)
    expected = np.sum((x @ (rows - candidate).T) ** 2) / np.sum((x @ rows.T) ** 2)
    assert reconstruct.output_error(rows, candidate, x.T @ x) == pytest.approx(expected)
    # A change in two columns only (removed channels) reads G where they are.
    few = rows.copy()
    few[:, [1, 4]] = 0
    expected = np.sum((x @ (rows - few).T) ** 2) / np.sum((x @ rows.T) ** 2)
    energy = reconstruct.output_energy(rows, x.T @ x)
    assert reconstruct.output_error(rows, few, x.T @ x, energy) == pytest.approx(expected)


# ---- real models ---------------------------------------------------------------------------


def _minilm_embeddings(model: bytes | Path, data: Path) -> np.ndarray:
    feed = dict(np.load(data))
    outputs = run_ort(model, feed)
    return next(o for o in outputs if o.dtype == np.float32 and o.ndim == 2)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    dots = np.einsum("ij,ij->i", a, b)
    return float(np.mean(dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.network
@pytest.mark.slow
def test_wanda_and_refit_beat_magnitude_on_minilm(tmp_path: Path):
    from models.fetch import fetch
    from models.text import minilm_dataset

    minilm = fetch("minilm")
    calibration = minilm_dataset(tmp_path / "calib.npz", n=64)
    evaluation = minilm_dataset(tmp_path / "eval.npz", n=200)
    reference = _minilm_embeddings(minilm, evaluation)

    def cosine(pass_: PrunePass) -> float:
        result = shrink(minilm, [pass_], check=False, calibration=calibration)
        return _cosine(reference, _minilm_embeddings(io.to_bytes(result.model), evaluation))

    magnitude = cosine(PrunePass())
    wanda = cosine(PrunePass(method="wanda", reconstruct="off"))
    refit = cosine(PrunePass(method="wanda", reconstruct="on"))
    assert magnitude < wanda < refit, (magnitude, wanda, refit)


def test_refit_lowers_the_digits_output_error(tmp_path: Path):
    with np.load(digits.TEST_DATA_PATH) as data:
        images = data["image"].astype(np.float32)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, image=images[:128])
    evaluation = {"image": images[128:]}
    (reference,) = run_ort(digits.MODEL_PATH, evaluation)

    def error(reconstruct_: str) -> float:
        # Only MatMul/Gemm are refit (no im2col Gram for Conv): prune the Gemm head alone.
        pass_ = PrunePass(sparsity=0.8, reconstruct=reconstruct_, exclude_op_types=("Conv",))
        result = shrink(digits.MODEL_PATH, [pass_], check=False, calibration=calibration)
        (logits,) = run_ort(io.to_bytes(result.model), evaluation)
        return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))

    assert error("on") < 0.5 * error("off")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nm": "2:4", "sparsity": 0.9}, "nm='2:4' fixes the sparsity"),
        ({"sparsity": 1.0}, "zeroes every weight"),
    ],
)
def test_options_that_would_be_ignored_or_zero_everything_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PrunePass(**options)


def test_the_summary_says_how_many_weights_pruning_zeroed():
    # Stored dense, zeros change no count or size: without the note the step read as a no-op.
    import onnx_shrink
    from models import digits

    result = onnx_shrink.shrink(digits.MODEL_PATH, "fold,prune", check=False)
    step = result.steps[-1]
    assert step.modified and step.note.startswith("50% of ") and "layers are zero" in step.note
    assert result.to_dict()["passes"][-1]["note"] == step.note


def test_a_refit_past_its_time_budget_is_skipped_with_a_warning(caplog):
    # One system per output row: on a large layer, hours. Past refit_seconds the layers stay
    # magnitude-pruned, unrefit, and the warning says how to refit them.
    import onnx_shrink
    from tests.compiler.test_unusual_graphs import mlp

    data = {"x": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)}

    model = mlp()

    def pruned(*sets):
        sets = ("prune.reconstruct=on", *sets)
        return onnx_shrink.shrink(model, "prune", sets=sets, calibration=data, check=False)

    with caplog.at_level(logging.WARNING):
        unrefit = pruned("prune.refit_seconds=0")
    assert "2 layers left unrefit (mm1, mm2)" in caplog.text
    assert "raise prune.refit_seconds" in caplog.text
    from onnx_shrink.compiler import io

    plain = onnx_shrink.shrink(model, "prune", check=False)  # magnitude, no refit
    assert io.to_bytes(unrefit.model) == io.to_bytes(plain.model)
    assert io.to_bytes(pruned().model) != io.to_bytes(plain.model)  # within the budget
    with pytest.raises(onnx_shrink.PipelineSpecError, match="refit_seconds"):
        onnx_shrink.shrink(model, "prune", sets="prune.refit_seconds=5", check=False)


def test_each_skipped_layer_is_said_once(caplog):
    """The pass's requests and its apply both find the layers: only apply says why each
    one was left (``-v`` printed every skip line twice)."""
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "W"], ["m"], name="small"),
            oh.make_node("MatMul", ["m", "V"], ["y"], name="big"),
        ],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 256])],
        {
            "W": rng.standard_normal((8, 64)).astype(np.float32),
            "V": rng.standard_normal((64, 256)).astype(np.float32),
        },
    )
    with caplog.at_level(logging.INFO):
        PrunePass()(io.load(proto))
    assert caplog.text.count("prune: skipping small (W)") == 1


def test_a_model_without_layers_to_prune_is_told_so_in_words(caplog):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        {},
    )
    with caplog.at_level(logging.WARNING):
        result = PrunePass()(io.load(proto))
    assert not result.modified
    assert "prune: no layer changed (no MatMul, Gemm or Conv)" in caplog.text
    assert ": 1" not in caplog.text


def test_a_weight_that_already_holds_the_zeros_asked_for_is_no_change(caplog):
    """whisper80's mel filterbank is 97.6 % zeros: prune kept every weight as it was and the
    summary still counted the pass as a change."""
    weight = np.zeros((16, 8), np.float32)
    weight[np.arange(16), np.arange(16) % 8] = np.random.default_rng(37).uniform(1, 2, 16)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        {"w": weight},
    )
    with caplog.at_level(logging.WARNING):
        result = PrunePass(sparsity=0.5, min_elements=0)(io.load(proto))
    assert not result.modified
    assert "prune: no change: the weights of 1 layer(s) already hold the zeros" in caplog.text
    assert "(87.5% zero)" in caplog.text
    np.testing.assert_array_equal(result.model.graph.initializers["w"].const_value.numpy(), weight)
