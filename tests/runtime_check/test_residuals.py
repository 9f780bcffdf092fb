"""Outputs that are an input plus a residual: the residual's own error is measured and a
large one is said, where the whole output's error hid it (RivaGAN's watermark encoder)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_shrink.runtime_check import check_notes, residuals
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.residuals import Residuals
from tests.helpers import parse, save_proto

RNG = np.random.default_rng(1207)


def test_the_residual_error_is_the_same_however_samples_are_batched():
    x = RNG.standard_normal((6, 40)).astype(np.float32)
    residual = 0.03 * RNG.standard_normal((6, 40)).astype(np.float32)
    reference = x + residual
    candidate = reference + 0.01 * RNG.standard_normal((6, 40)).astype(np.float32)
    whole, parts = Residuals(), Residuals()
    whole.add({"x": x}, {"y": reference}, {"y": candidate})
    for part in (slice(0, 2), slice(2, 6)):
        parts.add({"x": x[part]}, {"y": reference[part]}, {"y": candidate[part]})
    ((_, a),) = whole.accumulators.items()
    ((_, b),) = parts.accumulators.items()
    r, c, s = (v.astype(np.float64) for v in (reference, candidate, x))
    assert a.share == pytest.approx(np.linalg.norm(r - s) / np.linalg.norm(r), rel=1e-12)
    assert a.error == pytest.approx(np.linalg.norm(c - r) / np.linalg.norm(r - s), rel=1e-12)
    assert (b.share, b.error) == (pytest.approx(a.share, rel=1e-12), pytest.approx(a.error))


def model(scale: float, head: str = "y = Add (x, d)"):
    """x [N, 16] -> y: x plus ``scale`` times a fixed linear map of x (``head``)."""
    weights = np.random.default_rng(3).standard_normal((16, 16)) * scale
    values = ", ".join(f"{v:.8g}" for v in weights.ravel())
    return parse(
        f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 16] y) <float[16, 16] w = {{{values}}}> {{
  d = MatMul (x, w)
  {head}
}}
"""
    )


@pytest.fixture
def data(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(4).standard_normal((8, 16), np.float32))
    return tmp_path / "x.npz"


def test_a_small_residual_destroyed_is_said_where_the_whole_output_reads_fine(tmp_path, data):
    reference = save_proto(model(0.005), tmp_path / "ref.onnx")
    candidate = save_proto(model(0.0025), tmp_path / "cand.onnx")  # half the residual gone
    numeric = check(reference, candidate, data, latency_runs=0).numeric
    (out,) = numeric.outputs
    assert out.snr_db > 30  # the whole output: no large error
    assert out.residual_of == "x" and out.residual_share < 0.05
    assert out.residual_error == pytest.approx(0.5, rel=1e-4)
    assert out.residual_snr_db == pytest.approx(-20 * math.log10(out.residual_error))
    (note,) = check_notes.notes(numeric, ["prune"])
    assert note.startswith("large error in what 'y' adds to input 'x' (a residual of ")
    assert "relative error 0.5)" in note and "for prune, a lower prune.sparsity" in note


@pytest.mark.parametrize(
    ("scale", "head", "why"),
    [
        (0.5, "y = Add (x, d)", "the output is mostly the model's own"),
        (0.005, "y = Identity (x)", "the output is the input: no residual"),
    ],
)
def test_no_residual_is_measured_where_there_is_none(tmp_path, data, scale, head, why):
    reference = save_proto(model(scale, head), tmp_path / "ref.onnx")
    candidate = save_proto(model(scale / 2, head), tmp_path / "cand.onnx")
    numeric = check(reference, candidate, data, latency_runs=0).numeric
    (out,) = numeric.outputs
    assert out.residual_of is None, why
    assert not any("adds to input" in line for line in check_notes.notes(numeric))


@pytest.mark.parametrize("steps", [1, -2])
def test_a_shifted_copy_is_found_in_either_direction_and_a_residual_is_not_one(steps):
    x = RNG.standard_normal((2, 4, 16))
    moved = np.roll(x, -steps, axis=2)  # the positions that wrap round are the new ones
    shift = residuals.find_shift(moved, x)
    assert (shift.axis, shift.steps, shift.length) == (2, steps, 16)
    assert shift.new(moved).shape == (2, 4, abs(steps))
    assert residuals.find_shift(x + 0.01, x) is None


def cache(scale: float):
    """x [N, 4, 64] -> y: x moved one position along axis 2, the new last position ``scale``
    times x's last (a streaming model's cache)."""
    return parse(
        f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 64] x) => (float[N, 4, 64] y) {{
  axis = Constant <value = int64[1] {{2}}> ()
  one = Constant <value = int64[1] {{1}}> ()
  last = Constant <value = int64[1] {{63}}> ()
  end = Constant <value = int64[1] {{64}}> ()
  s = Constant <value = float {{{scale}}}> ()
  kept = Slice (x, one, end, axis)
  tail = Slice (x, last, end, axis)
  new = Mul (tail, s)
  y = Concat <axis = 2> (kept, new)
}}
"""
    )


def test_a_cache_shifted_one_step_is_said_by_its_new_positions_not_as_a_residual(tmp_path):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(5).standard_normal((8, 4, 64), np.float32))
    reference = save_proto(cache(0.9), tmp_path / "ref.onnx")
    candidate = save_proto(cache(0.45), tmp_path / "cand.onnx")  # the new position halved
    numeric = check(reference, candidate, data, latency_runs=0).numeric
    (out,) = numeric.outputs
    assert out.snr_db > 20  # 63 of 64 positions are exact copies
    assert (
        out.residual_of == "x" and out.residual_shift == "its last 1 of 64 positions along axis 2"
    )
    assert out.residual_error == pytest.approx(0.5, rel=1e-6)  # the new position's own error
    (note,) = check_notes.notes(numeric)
    assert note.startswith("large error in the new part of 'y', input 'x' shifted (its last 1")
    assert "adds to" not in note
