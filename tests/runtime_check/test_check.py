"""check(): a model against itself, and against a perturbed copy, on the digits model."""

from __future__ import annotations

import pytest

from models import digits
from models.perturb import perturbed_copy
from onnx_shrink.runtime_check.checker import check, compare
from onnx_shrink.runtime_check.compare import Tolerances

DATA = digits.TEST_DATA_PATH


def test_a_model_against_itself_has_zero_error_and_a_ratio_near_one():
    report = check(
        digits.MODEL_PATH,
        digits.MODEL_PATH,
        DATA,
        layers=True,
        latency_runs=40,
        tolerances=Tolerances(atol=0, min_cosine=1.0, max_accuracy_drop=0),
    )
    assert report.passed
    (out,) = report.numeric.outputs
    assert out.max_abs_error == 0 and out.cosine == pytest.approx(1.0)
    assert report.numeric.samples == 450
    assert report.numeric.reference_accuracy == report.numeric.candidate_accuracy >= 0.95
    assert report.layers.first_jump is None
    assert all(layer.relative_error == 0 for layer in report.layers.layers)
    assert 0.5 < report.latency.ratio < 2.0


def test_a_perturbed_layer_fails_and_is_named_first(tmp_path):
    bad = perturbed_copy(digits.MODEL_PATH, tmp_path / "bad.onnx", "conv2.0.weight", scale=0.5)
    report = check(
        digits.MODEL_PATH,
        bad,
        DATA,
        layers=True,
        latency_runs=0,
        tolerances=Tolerances(min_cosine=0.9999),
    )
    assert not report.passed
    assert report.layers.first_jump.tensor == "/conv2/conv2.0/Conv_output_0"
    assert report.layers.first_jump.op_type == "Conv"
    errors = {layer.tensor: layer.relative_error for layer in report.layers.layers}
    assert errors["/conv1/conv1.2/Relu_output_0"] == 0  # upstream of the perturbation


def test_compare_returns_a_numeric_report_with_accuracy():
    report = compare(digits.MODEL_PATH, digits.MODEL_PATH, DATA)
    assert report.reference_accuracy == report.candidate_accuracy
    assert report.to_dict()["passed"] is True
