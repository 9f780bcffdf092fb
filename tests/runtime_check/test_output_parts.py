"""Outputs that join parts of very different scales: the small part's own error is measured
and a large one is said, where the whole output's error hid it (a detector's class scores
beside its boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_shrink.runtime_check import check_notes
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.output_parts import SEPARATION, OutputParts, small_part
from tests.helpers import parse, save_proto

RNG = np.random.default_rng(1208)


def _detections(samples: int = 6) -> np.ndarray:
    """[N, 6, 50]: 2 rows of coordinates in pixels, then 4 rows of scores in (0, 1)."""
    boxes = RNG.uniform(50, 300, (samples, 2, 50))
    scores = RNG.uniform(0, 0.05, (samples, 4, 50))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def _result(parts: OutputParts):
    (accumulator,) = parts.accumulators.values()
    return accumulator.result()


def test_the_small_part_and_its_error_are_the_same_however_samples_are_batched():
    reference = _detections()
    candidate = reference * (1 + 0.2 * RNG.standard_normal(reference.shape)).astype(np.float32)
    whole, batched = OutputParts(), OutputParts()
    whole.add({"y": reference}, {"y": candidate})
    for rows in (slice(0, 1), slice(1, 6)):
        batched.add({"y": reference[rows]}, {"y": candidate[rows]})
    part, share, error = _result(whole)
    assert (part.axis, part.start, part.stop, part.length) == (1, 2, 6, 6)
    r, c = reference[:, 2:].astype(np.float64), candidate[:, 2:].astype(np.float64)
    assert error == pytest.approx(np.linalg.norm(c - r) / np.linalg.norm(r), rel=1e-12)
    assert share == pytest.approx(np.linalg.norm(r) / np.linalg.norm(reference), rel=1e-6)
    other = _result(batched)
    assert other[0] == part and other[1:] == pytest.approx((share, error), rel=1e-12)


@pytest.mark.parametrize(
    ("rms", "expected"),
    [
        ([100.0, 90.0, 0.01, 0.5], (2, 4)),  # every score row 180x under every box row
        ([0.01, 0.02, 100.0, 90.0], (0, 2)),  # the small part first
        ([100.0, 0.5, 2.0, 0.01], None),  # 2.0 is 50x under 100, and 4x over 0.5
        ([100.0, 90.0, 0.0, 0.0], None),  # zeros: no error of them to measure
        ([5.0, 3.0, 1.0, 0.5], None),  # a feature map's channels
    ],
)
def test_a_part_is_found_only_where_every_slice_of_it_is_far_under_every_other(rms, expected):
    part = small_part(np.square(np.array(rms)))
    assert (None if part is None else (part.start, part.stop)) == expected
    if part is not None:
        assert part.separation >= SEPARATION


def _model(score_scale: float):
    """x [N, 8] -> y [N, 6]: 2 columns in the hundreds, 4 scores ``score_scale`` times a
    fixed map."""
    weights = np.random.default_rng(3).standard_normal((8, 6))
    weights[:, :2] *= 100
    weights[:, 2:] *= 0.01 * score_scale
    values = ", ".join(f"{v:.8g}" for v in weights.ravel())
    return parse(
        f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 6] y) <float[8, 6] w = {{{values}}}> {{
  y = MatMul (x, w)
}}
"""
    )


def test_a_small_part_destroyed_is_said_where_the_whole_output_reads_fine(tmp_path):
    np.savez(tmp_path / "x.npz", x=RNG.standard_normal((16, 8)).astype(np.float32))
    reference = save_proto(_model(1.0), tmp_path / "ref.onnx")
    candidate = save_proto(_model(0.5), tmp_path / "cand.onnx")  # the scores halved
    numeric = check(reference, candidate, tmp_path / "x.npz", latency_runs=0).numeric
    (out,) = numeric.outputs
    assert out.snr_db > 40  # the whole output: no large error
    assert out.small_part.startswith("its slices 2-5 of 6 along axis 1")
    assert out.small_part_error == pytest.approx(0.5, rel=1e-5)
    (note,) = check_notes.notes(numeric, ["quant"])
    assert note.startswith("large error in part of 'y' (its slices 2-5 of 6 along axis 1")
    assert "relative error 0.5)" in note and "for quant, --sensitivity" in note
    same = check(reference, reference, tmp_path / "x.npz", latency_runs=0).numeric
    assert same.outputs[0].small_part_error == 0 and not check_notes.notes(same)
