"""A reference opened once for many comparisons runs each feed once, and the comparisons
read as those with the model itself."""

from __future__ import annotations

import contextlib

import numpy as np

from models import digits
from models.perturb import perturbed_copy
from onnx_shrink.compiler import io
from onnx_shrink.runtime_check import checker
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.reference_runs import CachedRuns, KeptRuns

DATA = digits.TEST_DATA_PATH


def test_each_feed_runs_once_and_comparisons_read_as_with_the_model_itself(tmp_path):
    candidates = [
        perturbed_copy(digits.MODEL_PATH, tmp_path / f"c{i}.onnx", "conv2.0.weight", scale=s)
        for i, s in enumerate((0.9, 0.5))
    ]
    with contextlib.ExitStack() as stack:
        reference = checker.Reference.open(digits.MODEL_PATH, stack)
        kept = [checker.compare(reference, c, DATA) for c in candidates]
        assert reference.kept.reused == len(reference.kept.files) > 0  # the second: from disk
        folder = reference.kept.folder
        assert any(folder.iterdir())
    assert not folder.exists()  # closing the stack deletes the outputs
    plain = [checker.compare(digits.MODEL_PATH, c, DATA) for c in candidates]
    assert [r.outputs for r in kept] == [r.outputs for r in plain]
    assert kept[0].outputs != kept[1].outputs


def test_other_feeds_are_run_not_taken_for_kept_ones():
    specs = data_mod.specs_from_model(io.load(digits.MODEL_PATH))
    first = data_mod.prepare(specs, DATA)
    feed = next(iter(first.batches())).feed
    other = {name: array[::-1].copy() for name, array in feed.items()}  # same shapes
    with contextlib.ExitStack() as stack:
        reference = checker.Reference.open(digits.MODEL_PATH, stack)
        same = checker.compare(reference, digits.MODEL_PATH, feed)
        flipped = checker.compare(reference, digits.MODEL_PATH, other)
        assert reference.kept.reused == 0 and len(reference.kept.files) == 2
    assert same.outputs[0].max_abs_error == flipped.outputs[0].max_abs_error == 0


class _StringSession:
    """A session whose one output is strings (onnxruntime gives them as object arrays)."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, names, feed, run_options=None):
        self.runs += 1
        return [np.array(["cat", "dog"], dtype=object)]


def test_runs_with_string_outputs_are_run_again_not_kept(tmp_path):
    # .npz would pickle them, and reading pickles back is refused: the search failed there.
    session = _StringSession()
    runs = CachedRuns(session, KeptRuns(tmp_path))
    feed = {"x": np.ones((2, 3), np.float32)}
    for _ in range(2):
        assert list(runs.run(["label"], feed)[0]) == ["cat", "dog"]
    assert session.runs == 2 and not any(tmp_path.iterdir())
