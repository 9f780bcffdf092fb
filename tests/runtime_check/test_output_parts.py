"""Outputs that join parts of very different scales: the small part's own error is measured
and a large one is said, where the whole output's error hid it (a detector's class scores
beside its boxes)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import check_notes, checker, output_parts
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sens
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.output_parts import SEPARATION, OutputParts, part_axes, small_part
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


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_the_small_part_and_its_error_are_the_same_however_samples_are_batched(chunk, monkeypatch):
    """In one batch or two, folded in at once or a sample at a time (``chunk``)."""
    monkeypatch.setattr(output_parts, "CHUNK_ELEMENTS", chunk)
    reference = _detections()
    candidate = reference * (1 + 0.2 * RNG.standard_normal(reference.shape)).astype(np.float32)
    whole, batched = OutputParts(), OutputParts()
    whole.add({"y": reference}, {"y": candidate})
    for rows in (slice(0, 1), slice(1, 6)):
        batched.add({"y": reference[rows]}, {"y": candidate[rows]})
    found = _result(whole)
    part = found.part
    assert (part.axis, part.start, part.stop, part.length) == (1, 2, 6, 6)
    r, c = reference[:, 2:].astype(np.float64), candidate[:, 2:].astype(np.float64)
    error = np.linalg.norm(c - r) / np.linalg.norm(r)
    assert found.relative_error == pytest.approx(error, rel=1e-12)
    cosine = (r * c).sum() / np.linalg.norm(r) / np.linalg.norm(c)
    assert found.cosine == pytest.approx(cosine, rel=1e-12)
    assert found.max_abs_error == np.abs(c - r).max()
    share = np.linalg.norm(r) / np.linalg.norm(reference)
    assert found.share == pytest.approx(share, rel=1e-6)
    assert part_axes(reference) == (1,) and part_axes(reference[:, :2]) == ()
    other = _result(batched)
    assert other.part == part
    assert (other.share, other.relative_error, other.cosine) == pytest.approx(
        (found.share, found.relative_error, found.cosine), rel=1e-12
    )


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


def _detector() -> ir.Model:
    """x -> trunk -> Relu -> {boxes (x30): [N, 4] | scores: 0.05 Sigmoid: [N, 8]} -> Concat."""
    rng = np.random.default_rng(0)
    weights = {
        "w0": rng.standard_normal((16, 32)),
        "wb": rng.standard_normal((32, 4)) * 30,
        "ws": rng.standard_normal((32, 8)) * 0.1,
    }
    lists = {k: ", ".join(f"{v:.8g}" for v in w.ravel()) for k, w in weights.items()}
    return io.load(
        parse(
            f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 12] y)
  <float[16, 32] w0 = {{{lists["w0"]}}}, float[32, 4] wb = {{{lists["wb"]}}},
   float[32, 8] ws = {{{lists["ws"]}}}, float k = {{0.05}}> {{
  h = MatMul (x, w0)
  r = Relu (h)
  b = MatMul (r, wb)
  s0 = MatMul (r, ws)
  s1 = Sigmoid (s0)
  s = Mul (s1, k)
  y = Concat <axis = 1> (b, s)
}}
"""
        )
    )


def _named(model: ir.Model) -> ir.Model:
    for node in model.graph:
        if node.op_type == "MatMul":
            node.name = {"w0": "trunk", "wb": "boxes", "ws": "scores"}[node.inputs[1].name]
    return model


def test_the_sensitivity_ranking_and_the_target_count_the_small_part():
    """Quantized alone, the score layer changes only the scores: the whole output's error
    ranked it last, where its scores moved most."""
    model = _named(_detector())
    x = np.random.default_rng(5).standard_normal((32, 16)).astype(np.float32)
    dataset = data_mod.prepare(data_mod.specs_from_model(model), {"x": x})
    report = sens.sensitivity(model, QuantPass(), dataset, hint=False)
    scores = next(layer for layer in report.layers if layer.node == "scores")
    assert scores.output.startswith("y (its slices 4-11 of 12 along axis 1")
    alone = onnx_shrink.shrink(
        model, "quant", sets="quant.exclude=trunk,boxes", calibration={"x": x}, check=False
    )
    (out,) = checker.compare(model, alone.model, dataset).outputs
    assert out.small_part_error > 10 * out.relative_error
    measured = sens._measured(model, ir.passes.PassResult(alone.model, True), dataset, "cpu")
    assert measured.error == out.small_part_error == out.scored_error
    assert scores.relative_error == pytest.approx(out.small_part_error, rel=0.05)
