"""One binary score a sample (a Sigmoid's probability, a linear layer's logit, [N, 1]): its
labels are scored at its threshold and its decisions compared, where they went unscored
(smart-turn's end-of-turn probability); other single columns name no class."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from onnx_shrink import CheckOptions, DataError, shrink
from onnx_shrink.runtime_check import labels
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.compare import compare_batches
from onnx_shrink.runtime_check.numeric_report import Tolerances
from tests.helpers import parse, save_proto

RNG = np.random.default_rng(20261207)
FEATURES = 8
WEIGHTS = RNG.standard_normal((FEATURES, 1)).astype(np.float32)
"""The single output column's weights: a sample is class 1 where x @ WEIGHTS > 0"""

HEADS = {
    "sigmoid": "h = Gemm (x, w)\n  y = Sigmoid (h)",
    "gemm": "y = Gemm (x, w)",
    "matmul and bias": "m = MatMul (x, w)\n  y = Add (m, b)",
    "squeezed sigmoid": "h = Gemm (x, w)\n  p = Sigmoid (h)\n  y = Squeeze (p, axes)",
    "relu": "h = Gemm (x, w)\n  y = Relu (h)",
}


def head_model(head: str, weights: np.ndarray = WEIGHTS):
    """x [N, 8] -> one score a sample, written as ``HEADS[head]``."""
    shape = "float[N]" if head.startswith("squeezed") else "float[N, 1]"
    values = ", ".join(f"{v:.8g}" for v in weights.ravel())
    return parse(
        f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, {FEATURES}] x) => ({shape} y)
  <float[{FEATURES}, 1] w = {{{values}}}, float[1] b = {{0.0}}, int64[1] axes = {{1}}> {{
  {HEADS[head]}
}}
"""
    )


def test_thresholds_are_read_from_the_graph():
    found = {
        head: labels.binary_score_outputs(ir.serde.deserialize_model(head_model(head)).graph)
        for head in HEADS
    }
    assert found == {
        "sigmoid": {"y": 0.5},
        "gemm": {"y": 0.0},
        "matmul and bias": {"y": 0.0},
        "squeezed sigmoid": {"y": 0.5},
        "relu": {},  # a single column of anything else names no class
    }


@pytest.mark.parametrize("head", ["sigmoid", "matmul and bias"])
def test_labels_are_scored_on_one_binary_score_a_sample(tmp_path, head):
    x = np.random.default_rng(7).standard_normal((64, FEATURES)).astype(np.float32)
    truth = (x @ WEIGHTS).ravel() > 0
    given = truth.copy()
    given[:8] = ~given[:8]  # 8 wrong labels: the reference scores 56 of 64
    flipped = WEIGHTS.copy()
    largest = np.abs(flipped).argmax()
    flipped[largest] = -flipped[largest]  # the candidate decides many samples the other way
    decided = (x @ flipped).ravel() > 0
    np.savez(tmp_path / "data.npz", x=x, labels=given.astype(np.int64))
    reference = save_proto(head_model(head), tmp_path / "ref.onnx")
    candidate = save_proto(head_model(head, flipped), tmp_path / "cand.onnx")
    report = check(reference, candidate, tmp_path / "data.npz", latency_runs=0).numeric
    assert report.reference_accuracy == 56 / 64
    assert report.candidate_accuracy == float(np.mean(decided == given))
    assert report.outputs[0].top1_agreement == float(np.mean(decided == truth)) < 1


def test_labels_a_binary_score_has_no_class_for_fail_an_accuracy_tolerance(tmp_path):
    x = RNG.standard_normal((6, FEATURES)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, labels=np.array([0, 1, 2, 0, 1, 0]))
    model = save_proto(head_model("sigmoid"), tmp_path / "m.onnx")
    with pytest.raises(DataError, match=r"one binary score a sample: class 1 above 0\.5"):
        options = CheckOptions(
            data=tmp_path / "data.npz", tolerances=Tolerances(max_accuracy_drop=0.01)
        )
        shrink(model, "fold", output=tmp_path / "out.onnx", check=options)


def test_a_single_column_of_another_op_keeps_its_labels_unscored(tmp_path, caplog):
    x = RNG.standard_normal((6, FEATURES)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, labels=np.array([0, 1, 1, 0, 1, 0]))
    model = save_proto(head_model("relu"), tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING):
        report = check(model, model, tmp_path / "data.npz", latency_runs=0).numeric
    assert report.reference_accuracy is None
    assert "one binary score a sample (a Sigmoid's or a linear layer's" in caplog.text


def test_a_score_at_the_threshold_names_class_0():
    scores = np.array([[0.5], [0.7], [0.2]], np.float32)
    outputs = {"p": scores}
    report = compare_batches(
        [(outputs, outputs, np.array([0, 1, 0]))],
        binary_outputs={"p": 0.5},
        tolerances=Tolerances(max_accuracy_drop=0),
    )
    assert report.reference_accuracy == 1.0 and report.outputs[0].top1_agreement == 1.0
