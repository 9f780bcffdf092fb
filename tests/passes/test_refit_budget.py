"""prune's refit budget: shared among the layers, direct solves first, conjugate gradients
cut to what their share pays for, everything in full where everything fits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnx_shrink.passes import reconstruct, refit_budget
from onnx_shrink.passes.prune_masks import row_keep

# A direct solve: 64 rows of 64 inputs, 32 kept. Conjugate gradients: 1024 rows of 1024.
SMALL, LARGE = (64, 64, 32), (1024, 1024, 512)


def _keep(shape: tuple[int, int, int]) -> np.ndarray:
    """Each row keeping inputs of its own (an unstructured mask)."""
    rows, k, kept = shape
    return row_keep(np.random.default_rng(rows).random((rows, k)), 1 - kept / k)


def _budget(seconds: float, shapes: dict[str, tuple[int, int, int]]) -> refit_budget.RefitBudget:
    """A budget whose clock counts 1 ns a multiply-add and a cube unit (not timed)."""
    expected = {key: reconstruct.uniform_costs(*shape) for key, shape in shapes.items()}
    budget = refit_budget.RefitBudget(seconds, expected)
    budget.clock._cube_rate = budget.clock._product_rate = 1e-9
    return budget


def _run(budget, shapes) -> dict[str, int | None | str]:
    """Each layer's allotment (None: in full, "unrefit"), the clock fed its estimate."""
    result = {}
    for key, shape in shapes.items():
        allotment = budget.allot(key, key, _keep(shape))
        if allotment is None:
            result[key] = "unrefit"
            continue
        result[key] = allotment.iterations
        budget.spent(allotment, allotment.estimate)
    return result


def test_where_everything_fits_every_layer_is_refit_in_full():
    shapes = {"a": SMALL, "b": LARGE, "c": SMALL, "d": LARGE}
    assert _run(_budget(1e4, shapes), shapes) == dict.fromkeys(shapes)  # all None: in full
    assert _run(_budget(float("inf"), shapes), shapes) == dict.fromkeys(shapes)


def test_direct_solves_come_first_and_conjugate_gradients_share_the_rest(caplog):
    """A first-come budget refit the first large layer in full and left the second with
    nothing: now both run the iterations their share of it pays for."""
    shapes = {"a": SMALL, "b": LARGE, "c": SMALL, "d": LARGE}
    budget = _budget(100.0, shapes)
    allotted = _run(budget, shapes)
    assert allotted["a"] is None and allotted["c"] is None  # direct: in full
    b, d = allotted["b"], allotted["d"]
    # 100 s over two layers of 1.07 s + 2.1 s an iteration: about 23 iterations each
    assert refit_budget.MIN_ITERATIONS <= b <= d < reconstruct.EXPECTED_ITERATIONS
    assert abs(b - 23) <= 1 and abs(d - 23) <= 1
    assert budget.clock.seconds <= 100.0
    with caplog.at_level(logging.WARNING):
        budget.warn()
    assert "2 layers refit partly (conjugate gradients stopped at their share: b, d)" in (
        caplog.text
    )
    assert "left unrefit" not in caplog.text and "raise prune.refit_seconds" in caplog.text


def test_a_share_too_small_for_the_least_iterations_leaves_the_layer_unrefit(caplog):
    shapes = {"a": SMALL, "b": LARGE, "c": SMALL}
    budget = _budget(10.0, shapes)
    assert _run(budget, shapes) == {"a": None, "b": "unrefit", "c": None}
    with caplog.at_level(logging.WARNING):
        budget.warn()
    assert "1 layer left unrefit (b)" in caplog.text
    assert _run(_budget(0.0, shapes), shapes) == dict.fromkeys(shapes, "unrefit")


def test_a_later_direct_solve_that_cannot_fit_reserves_nothing():
    """Found in review: a direct solve costing more than the whole budget was set aside in
    full, so the layer before it got nothing and then it was refused too: nothing refit."""
    huge = (30000, 700, 350)  # a direct solve of about 1286 s
    shapes = {"b": LARGE, "head": huge}
    budget = _budget(300.0, shapes)
    assert _run(budget, shapes) == {"b": None, "head": "unrefit"}


def test_a_refit_cut_short_lowers_the_error_and_reads_it_exactly(monkeypatch):
    """Every conjugate-gradient iteration lowers each row's error: stopped early, a row keeps
    where it got to (not solved directly, as a row that fails to converge is), and the error
    read off the solve is still the layer's."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 150)) @ rng.normal(size=(150, 150))
    rows, gram = rng.normal(size=(20, 150)), x.T @ x
    keep = row_keep(np.abs(rows), 0.5)
    monkeypatch.setattr(reconstruct, "ITERATIVE_BREAK_EVEN", 0.0)
    full = reconstruct.refit_measured(rows, keep, gram)
    errors = []
    for iterations in (1, 3, 10):
        cut = reconstruct.refit_measured(rows, keep, gram, iterations=iterations)
        assert not cut.complete and np.all(cut.rows[~keep] == 0)
        assert cut.error == pytest.approx(reconstruct.output_error(rows, cut.rows, gram), 1e-9)
        errors.append(cut.error)
    unrefit = reconstruct.output_error(rows, np.where(keep, rows, 0.0), gram)
    assert unrefit > errors[0] > errors[1] > errors[2] > full.error and full.complete
