"""Streaming comparison statistics: exact formulas, batching independence, tolerances."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_shrink.errors import DataError
from onnx_shrink.runtime_check.compare import ErrorAccumulator, compare_batches
from onnx_shrink.runtime_check.numeric_report import Tolerances

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    ref=hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 6)), elements=finite),
    noise=st.floats(0, 1),
    split=st.integers(1, 11),
)
def test_results_do_not_depend_on_how_samples_are_batched(ref, noise, split):
    cand = (ref + noise * np.sin(np.arange(ref.size).reshape(ref.shape))).astype(np.float32)
    whole, parts = ErrorAccumulator("y"), ErrorAccumulator("y")
    whole.add(ref, cand)
    cut = min(split, len(ref))
    parts.add(ref[:cut], cand[:cut])
    parts.add(ref[cut:], cand[cut:])
    a, b = whole.result(), parts.result()
    assert a.max_abs_error == b.max_abs_error
    for field in ("mean_abs_error", "relative_error", "cosine"):
        assert math.isclose(getattr(a, field), getattr(b, field), rel_tol=1e-9, abs_tol=1e-12)


def test_metrics_follow_their_definitions():
    ref = np.array([[3.0, 4.0]], np.float32)
    cand = np.array([[3.0, 3.0]], np.float32)
    acc = ErrorAccumulator("y")
    acc.add(ref, cand)
    r = acc.result()
    assert r.max_abs_error == 1.0
    assert r.mean_abs_error == 0.5
    assert math.isclose(r.relative_error, 1 / 5)  # ||(0, 1)|| / ||(3, 4)||
    assert math.isclose(r.cosine, (9 + 12) / (5 * math.sqrt(18)))
    assert math.isclose(r.snr_db, 10 * math.log10(25 / 1))
    assert r.top1_agreement == 0.0  # argmax 1 vs argmax 0 (tie goes to the first)


def test_identical_outputs_have_infinite_snr_and_cosine_one():
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    acc = ErrorAccumulator("y")
    acc.add(x, x.copy())
    r = acc.result()
    assert (r.max_abs_error, r.cosine, r.snr_db, r.relative_error) == (0.0, 1.0, math.inf, 0.0)


def test_nan_and_inf_in_the_candidate_are_counted_and_fail():
    ref = np.ones((1, 4), np.float32)
    cand = np.array([[1, np.nan, np.inf, 1]], np.float32)
    report = compare_batches([({"y": ref}, {"y": cand}, None)])
    (out,) = report.outputs
    assert (out.nan_count, out.inf_count) == (1, 1)
    assert not report.passed
    assert "1 NaN and 1 Inf" in report.failures[0]


def test_an_all_nan_candidate_does_not_read_as_a_perfect_match():
    """The figures were taken over the elements finite in both: none, so error 0 and cosine
    1.0 beside 4 NaN. Where the candidate has NaN/Inf the reference has not, they say so."""
    ref = np.ones((1, 4), np.float32)
    report = compare_batches([({"y": ref}, {"y": np.full((1, 4), np.nan, np.float32)}, None)])
    (out,) = report.outputs
    assert out.nan_count == 4
    assert (out.max_abs_error, out.mean_abs_error, out.relative_error) == (math.inf,) * 3
    assert math.isnan(out.cosine) and out.snr_db == -math.inf
    assert not report.passed


def test_elementwise_tolerances_count_violations_like_allclose():
    ref = np.array([1.0, 10.0, 100.0], np.float32)
    cand = np.array([1.05, 10.5, 101.0], np.float32)
    tolerances = Tolerances(atol=0.01, rtol=0.02)
    report = compare_batches([({"y": ref}, {"y": cand}, None)], tolerances=tolerances)
    expected = int(np.sum(~np.isclose(cand, ref, rtol=0.02, atol=0.01)))
    assert report.outputs[0].outside_tolerance == expected == 2
    assert "2 of 3 elements exceed" in report.failures[0]


def test_accuracy_drop_and_cosine_tolerances():
    labels = np.array([0, 1, 1, 0])
    ref = np.array([[2, 1], [0, 3], [1, 2], [5, 0]], np.float32)
    cand = np.array([[2, 1], [3, 0], [1, 2], [0, 5]], np.float32)  # two samples flip
    report = compare_batches(
        [({"logits": ref}, {"logits": cand}, labels)],
        tolerances=Tolerances(min_cosine=0.99, max_accuracy_drop=0.25),
    )
    assert (report.reference_accuracy, report.candidate_accuracy) == (1.0, 0.5)
    assert report.outputs[0].top1_agreement == 0.5
    assert len(report.failures) == 2
    assert any("accuracy dropped 50.00%" in f for f in report.failures)


def test_labels_no_output_can_be_scored_on_fail_an_accuracy_tolerance():
    import numpy as np

    from onnx_shrink.runtime_check.compare import compare_batches
    from onnx_shrink.runtime_check.numeric_report import Tolerances

    out = {"boxes": np.ones((4, 1), np.float32)}  # no [samples, classes] output
    batches = [(out, out, np.arange(4))]
    asked = Tolerances(max_accuracy_drop=0.01)
    report = compare_batches(batches, tolerances=asked)
    assert not report.passed and "no output holds per-sample class scores" in report.failures[0]
    # As a default (check's, --verify-each's), it judges accuracy only where it can.
    report = compare_batches(batches, tolerances=asked.as_default())
    assert report.passed and report.verdict == "PASS (accuracy not measured)"
    assert compare_batches(batches).verdict == "measured, no tolerances given"


def test_labels_no_output_can_be_scored_on_are_warned_of_without_a_tolerance(caplog):
    # smart-turn's one sigmoid column [N, 1]: its labels were dropped without a word unless
    # --max-accuracy-drop was given.
    import logging

    from onnx_shrink.runtime_check.compare import compare_batches

    out = {"probability": np.full((4, 1), 0.7, np.float32)}
    with caplog.at_level(logging.WARNING):
        report = compare_batches([(out, out, np.arange(4) % 2)])
    assert report.reference_accuracy is None
    assert "accuracy not measured: labels were given, but no output holds" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        compare_batches([(out, out, None)])  # no labels: nothing to say
    assert "accuracy not measured" not in caplog.text


BAD_LABELS = {
    "strings": (np.array(["cat"] * 4), "labels are strings"),
    "non-integers": (np.array([0.0, 2.5, 1.0, 1.0]), r"labels are not integers \(sample 1: 2.5\)"),
    "NaN": (np.array([0.0, 2.0, np.nan, 1.0]), r"labels are not integers \(sample 2: nan\)"),
    "negative": (np.array([0, 2, -1, 1]), r"label -1 \(sample 2\) is negative"),
    "repeated indices": (np.stack([np.array([0, 2, 1, 1])] * 3, 1), "labels of shape 2x3 are not"),
    "outside the classes": (np.array([0, 2, 1, 3]), r"label 3 \(sample 3\) is outside \[0, 3\)"),
    "rows of other classes": (np.eye(4)[[0, 1, 2, 3]], "rows of 4 classes, but the scored output"),
}


@pytest.mark.parametrize(("labels", "message"), BAD_LABELS.values(), ids=BAD_LABELS)
def test_labels_that_cannot_score_accuracy_fail_an_accuracy_tolerance(labels, message, caplog):
    """They were scored anyway (0% for both models, no drop: the tolerance passed). Under an
    accuracy tolerance they are a DataError; without one, accuracy is left unmeasured."""
    logits = np.eye(3, dtype=np.float32)[[0, 2]]
    outputs = {"logits": logits}
    batches = [(outputs, outputs, labels[:2]), (outputs, outputs, labels[2:])]
    with pytest.raises(DataError, match=message):
        compare_batches(batches, tolerances=Tolerances(max_accuracy_drop=0.01), data="d.npz")
    report = compare_batches(batches, data="d.npz")
    assert report.reference_accuracy is None and report.passed
    assert "accuracy is not measured" in caplog.text


def test_nan_both_models_hold_is_left_out_of_the_mean_and_of_top1():
    """caustic-nmr outputs NaN for absent atoms, in both models: the mean abs error counted
    those elements (0.25 where every comparable element is off by 1), and top-1 counted rows
    of NaN as agreeing (numpy's argmax is the first NaN)."""
    reference = np.full((16, 4), np.nan, np.float32)
    reference[:, 0] = 0.0
    reference[8:, 1:] = np.arange(3)  # rows 8..15: finite, argmax at column 3
    candidate = reference + 1.0
    candidate[8:, 1] = 10.0  # its argmax moves to column 1
    acc = ErrorAccumulator("y")
    acc.add(reference, candidate)
    result = acc.result()
    assert result.mean_abs_error == pytest.approx((8 * 1.0 + 8 * (1 + 10 + 1 + 1)) / (8 + 32))
    assert result.elements == 8 + 32
    assert result.top1_agreement == 0.0  # 8 comparable rows, none agree


def test_elements_out_of_tolerance_are_told_of_every_element_the_reference_holds_finite():
    """Candidate NaN where the reference is finite count as out of tolerance; the message
    read '7 of 2 elements' when its total counted only the elements finite in both."""
    from onnx_shrink.runtime_check.compare import judge

    reference = np.zeros((1, 9), np.float32)
    candidate = np.full((1, 9), np.nan, np.float32)
    candidate[0, :2] = 0.0
    tolerances = Tolerances(atol=0.01)
    acc = ErrorAccumulator("y", tolerances)
    acc.add(reference, candidate)
    messages = judge([acc.result()], None, None, tolerances)
    assert any("7 of 9 elements exceed" in m for m in messages), messages


def test_outputs_folded_in_chunks_give_the_figures_of_the_whole(monkeypatch):
    """Large outputs are folded a chunk at a time (float64 copies of a whole 34M-value
    output took seconds to allocate): every figure stays what the whole output gives,
    NaN/Inf and tolerance counts across chunk edges included."""
    import sys

    compare = sys.modules[ErrorAccumulator.__module__]  # the package exports a compare()
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((5, 41)).astype(np.float32)
    candidate = reference + 0.05 * rng.standard_normal(reference.shape).astype(np.float32)
    candidate.flat[[6, 7, 13, 120]] = [np.nan, np.inf, -np.inf, np.nan]
    reference.flat[13] = -np.inf  # agreement, not error
    tolerances = Tolerances(atol=0.02, rtol=0.01)

    def figures(chunk: int):
        monkeypatch.setattr(compare, "CHUNK_ELEMENTS", chunk)
        acc = ErrorAccumulator("y", tolerances)
        acc.add(reference, candidate)
        acc.add(reference[:2], reference[:2])  # a finite, mask-free batch too
        return acc, acc.result()

    whole_acc, whole = figures(1 << 20)
    for chunk in (1, 7, 64):
        acc, got = figures(chunk)
        assert (acc.nan, acc.inf, acc.outside, acc.count) == (
            whole_acc.nan,
            whole_acc.inf,
            whole_acc.outside,
            whole_acc.count,
        )
        for field in ("max_abs_error", "mean_abs_error", "reference_max_abs", "elements"):
            assert getattr(got, field) == pytest.approx(getattr(whole, field), rel=1e-12)
        assert (acc.diff_sq, acc.ref_sq, acc.dot) == pytest.approx(
            (whole_acc.diff_sq, whole_acc.ref_sq, whole_acc.dot), rel=1e-12
        )
    assert whole_acc.nan == 2 and whole_acc.inf == 1


def test_an_output_nan_in_both_models_is_said_to_compare_nothing(caplog):
    """Found in an audit (swift-f0 on synthetic audio: its pitch output is NaN in both
    models): the table showed error 0, cosine 1 and SNR inf, a perfect match, unflagged."""
    nan = np.full((2, 8), np.nan, np.float32)
    batches = [({"pitch_all_nan": nan}, {"pitch_all_nan": nan.copy()}, None)]
    with caplog.at_level(logging.WARNING):
        (out,) = compare_batches(batches).outputs
    assert (out.elements, out.uncompared) == (0, 16)
    assert "output 'pitch_all_nan': every element is NaN/Inf in both models (16)" in caplog.text
