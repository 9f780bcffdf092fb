"""A large error's note names the fix of each lossy pass that made the candidate: after prune
alone it sent users to quant.max_error and --sensitivity, options of a pass they never ran."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import onnx_shrink
from models import digits
from onnx_shrink import console
from onnx_shrink.compiler import registry
from onnx_shrink.runtime_check import check_notes, checker
from onnx_shrink.runtime_check.compare import compare_batches
from tests.helpers import digits_images, target_outcome

QUANT_FIX = "for quant, --sensitivity ranks the layers that cost it"
PRUNE_FIX = "for prune, a lower prune.sparsity zeroes fewer weights"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> onnx_shrink.ShrinkResult:
    """The digits CNN at 50% magnitude sparsity: logits at cosine 0.988, a large error."""
    check = onnx_shrink.CheckOptions(data={"image": digits_images()}, latency_runs=0)
    output = tmp_path_factory.mktemp("pruned") / "pruned.onnx"
    return onnx_shrink.shrink(digits.MODEL_PATH, "fold,prune", output=str(output), check=check)


def test_after_prune_the_note_names_prune_s_fix_and_not_quant_s(pruned):
    verification = pruned.verification
    assert verification.passes == verification.pipeline == ("fold", "prune")
    (note,) = verification.notes()
    assert note.startswith("large error: 'logits'")
    assert note.endswith(f"--layers shows where the error first jumps; {PRUNE_FIX}")
    assert "quant" not in note
    assert pruned.to_dict()["verification"]["notes"] == [note]
    assert str(console.check_tables(verification)[0].caption) == note


def test_each_lossy_pass_s_fix_is_named_once_in_pipeline_order(pruned):
    numeric = pruned.verification.numeric
    (note,) = check_notes.notes(numeric, ("fold", "prune", "quant", "prune"))
    assert note.index(PRUNE_FIX) < note.index(QUANT_FIX)
    assert note.count("for prune,") == 1 and note.count("for quant,") == 1
    # Lossless passes only: where to look, no fix to name.
    (note,) = check_notes.notes(numeric, ("fold",))
    assert note.endswith("--layers shows where the error first jumps")


def test_a_standalone_check_of_the_same_file_names_quant_s_fix(pruned):
    """``onnx-shrink check`` cannot know what made the candidate."""
    report = checker.check(
        digits.MODEL_PATH, pruned.output_path, {"image": digits_images()}, latency_runs=0
    )
    assert report.passes is None
    (note,) = report.notes()
    assert QUANT_FIX in note and PRUNE_FIX not in note


@pytest.mark.parametrize("name", sorted(check_notes.FIXES))
def test_every_fix_names_options_its_pass_has(name):
    fields = {f.name for f in dataclasses.fields(registry.pass_class(name))}
    named = re.findall(rf"\b{re.escape(name)}\.([a-z_]+)", check_notes.FIXES[name])
    assert named, f"{name}'s fix names none of its options"
    assert set(named) <= fields


def test_every_output_under_the_snr_floor_is_named_worst_first(pruned):
    """A spindle detector after prune-channels: its segmentation map (12.2 dB SNR) went
    unsaid beside its detection output (6.5 dB), the only one the note named."""
    numeric = pruned.verification.numeric
    (logits,) = numeric.outputs
    fine = dataclasses.replace(logits, name="fine", snr_db=35.0)
    worse = dataclasses.replace(logits, name="worse", snr_db=logits.snr_db - 3)
    (note,) = check_notes.notes(dataclasses.replace(numeric, outputs=[logits, fine, worse]))
    assert note.startswith(f"large error: 'worse' keeps {logits.snr_db - 3:.1f} dB SNR")
    assert f", 'logits' keeps {logits.snr_db:.1f} dB SNR" in note and "'fine'" not in note
    many = [dataclasses.replace(logits, name=f"out{k}", snr_db=5.0 + k) for k in range(5)]
    (note,) = check_notes.notes(dataclasses.replace(numeric, outputs=many))
    assert "'out2'" in note and "'out3'" not in note and ", and 2 more outputs;" in note


def test_elements_nan_in_both_models_are_said_to_be_left_out():
    """caustic's NMR shifts are NaN wherever its atom mask is false, in both models: the
    table's NaN/Inf column (new ones only) read 0/0 and the 31 elements its figures left out
    were in the JSON report only."""
    rng = np.random.default_rng(71)
    reference = rng.normal(size=(2, 16)).astype(np.float32)
    reference[:, 12:] = np.nan
    candidate = reference + np.float32(0.01) * rng.normal(size=reference.shape).astype(np.float32)
    numeric = compare_batches([({"shifts": reference}, {"shifts": candidate}, None)])
    (note,) = check_notes.notes(numeric)
    assert note == (
        "not compared: 8 elements of 'shifts' are NaN/Inf in both models; its figures cover "
        "the 24 finite in both"
    )
    (out,) = numeric.outputs
    assert (out.nan_count, out.inf_count) == (0, 0)
    # An output finite everywhere gets no such note.
    finite = compare_batches([({"y": reference[:, :12]}, {"y": candidate[:, :12]}, None)])
    assert check_notes.notes(finite) == []


def _target(max_error: float, error: float, met: bool):
    """A quant.max_error search's outcome as it would come from 16 calibration samples."""
    return target_outcome(max_error=max_error, error=error, met=met, layers=12)


def _checked(relative_error: float):
    """A check of 8 samples whose one output has about ``relative_error``."""
    rng = np.random.default_rng(83)
    batches = []
    for _ in range(8):
        reference = rng.normal(size=(1, 64)).astype(np.float32)
        noise = rng.normal(size=reference.shape).astype(np.float32)
        batches.append(({"probs": reference}, {"probs": reference + relative_error * noise}, None))
    return dataclasses.replace(compare_batches(batches), samples=len(batches))


def test_a_target_met_on_calibration_and_missed_on_the_checked_samples_is_said():
    """Sweep 13's PP-OCRv5 rec at quant.max_error=0.05: 0.0285 over the 16 calibration
    samples, 0.113 over the 8 checked, and the note's fix was to set quant.max_error=0.1."""
    numeric = _checked(0.11)
    error = numeric.outputs[0].relative_error
    target = _target(0.05, 0.0285, met=True)
    large, missed = check_notes.notes(numeric, ("fold", "quant"), targets=(target,))
    assert "quant.max_error=0.1" not in large
    assert large.endswith(
        "for quant, --sensitivity ranks the layers that cost it, and a quant.max_error below "
        f"0.05 keeps more of them float; {check_notes.EQUALIZE_FIX}"
    )
    assert missed == (
        "quant.max_error=0.05 holds on the 16 calibration samples it was measured on (0.0285), "
        f"not on the 8 samples checked: 'probs' has relative error {error:.3g}; the layers "
        "kept float were chosen to fit the calibration samples, and more of them, like the "
        "checked ones, or a lower quant.max_error carry the target over"
    )
    # Other lossy passes add their error to the check's.
    notes = check_notes.notes(numeric, ("prune", "quant"), targets=(target,))
    assert f"{error:.3g}, prune adding theirs;" in notes[1]
    # A target the check's samples meet too, or one rolled back, says nothing more.
    assert len(check_notes.notes(numeric, ("quant",), targets=(_target(0.2, 0.1, True),))) == 1
    rolled = dataclasses.replace(target, rolled_back=True)
    assert len(check_notes.notes(numeric, ("quant",), targets=(rolled,))) == 1


def test_quant_s_fix_builds_on_the_target_missed_and_on_equalize_already_run():
    numeric = _checked(0.11)
    (large,) = check_notes.notes(numeric, ("quant",), targets=(_target(0.01, 0.04, False),))
    assert large.endswith(
        "for quant, quant.max_error=0.01 was missed on the calibration data too (0.04 at best), "
        "and quant.exclude_op_types keeps whole op types float; "
        f"{check_notes.EQUALIZE_FIX}"
    )
    fields = {f.name for f in dataclasses.fields(registry.pass_class("quant"))}
    assert set(re.findall(r"\bquant\.([a-z_]+)", large)) <= fields
    # fold,equalize,quant: equalize is not proposed again, whether it changed the model or not.
    for passes in (("fold", "equalize", "quant"), ("fold", "quant")):
        (large,) = check_notes.notes(numeric, passes, pipeline=("fold", "equalize", "quant"))
        assert "equalize" not in large
        assert large.endswith(
            "keeps the worst of them float until every output's relative error is within 0.1"
        )
