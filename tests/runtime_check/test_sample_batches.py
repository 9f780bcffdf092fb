"""Cutting a source's batches into samples and joining them again: order and shapes decide."""

from __future__ import annotations

import numpy as np

from onnx_shrink.compiler.io import data_files
from onnx_shrink.runtime_check import data, sample_batches
from onnx_shrink.runtime_check.data import Batch, InputSpec
from onnx_shrink.runtime_check.sample_batches import grouped_samples, joinable, split


def _sample(value: float, width: int = 4, label: int | None = None) -> Batch:
    labels = None if label is None else np.array([label])
    return Batch({"x": np.full((1, width), value, np.float32)}, 1, labels)


def test_consecutive_samples_are_joined_up_to_the_size_read_at_each_run():
    sizes = iter([3, 2, 2, 2, 2])
    runs = list(grouped_samples([_sample(i, label=i) for i in range(7)], lambda: next(sizes)))
    assert [run.samples for run in runs] == [3, 2, 2]
    np.testing.assert_array_equal(runs[0].feed["x"][:, 0], [0, 1, 2])
    np.testing.assert_array_equal(np.concatenate([r.labels for r in runs]), np.arange(7))


def test_a_change_of_shape_or_dtype_ends_a_run():
    samples = [_sample(0), _sample(1), _sample(2, width=5), _sample(3, width=5), _sample(4)]
    samples.append(Batch({"x": np.ones((1, 4), np.float64)}, 1, None))
    runs = list(grouped_samples(samples, lambda: 8))
    assert [(run.samples, run.feed["x"].shape[1]) for run in runs] == [
        (2, 4),
        (2, 5),
        (1, 4),
        (1, 4),
    ]
    assert runs[-1].feed["x"].dtype == np.float64


def test_a_batch_that_is_not_one_sample_runs_alone():
    whole = Batch({"x": np.zeros((3, 4), np.float32)}, 3, None)
    runs = list(grouped_samples([_sample(0), whole, _sample(1), _sample(2)], lambda: 8))
    assert [run.samples for run in runs] == [1, 3, 2]
    assert runs[1] is whole


def test_split_gives_each_sample_back():
    joined = next(grouped_samples([_sample(i, label=i) for i in range(3)], lambda: 8))
    singles = list(split(joined, {"x"}))
    assert [float(s.feed["x"][0, 0]) for s in singles] == [0.0, 1.0, 2.0]
    assert [int(s.labels[0]) for s in singles] == [0, 1, 2]


def test_only_models_whose_every_input_has_a_dynamic_first_axis_are_joinable():
    dynamic = InputSpec("x", np.float32, ("N", 4))
    unknown = InputSpec("y", np.float32, (None, 4))
    fixed = InputSpec("state", np.float32, (1, 64))
    assert joinable([dynamic, unknown])
    assert not joinable([dynamic, fixed])
    assert not joinable([InputSpec("scalar", np.float32, ())])
    assert not joinable([])


def test_joining_hands_back_the_pages_its_copy_read(tmp_path, monkeypatch):
    """``split`` hands a sample's pages back as the next is cut, but the joined copy reads
    them again: they go back once copied, or a batch of the file stays resident."""
    path = tmp_path / "calib.npz"
    data_files.save_npz(path, {"x": np.arange(8, dtype=np.float32)[:, None].repeat(4, axis=1)})
    mapped = data_files.load_npz(path)["x"]
    copied: list[int] = []
    released_after_copy: list[int] = []
    real_concatenate, real_release = np.concatenate, data_files.release_pages

    def concatenate(arrays, *args, **kwargs):
        copied.extend(int(a[0, 0]) for a in arrays if isinstance(a, np.memmap))
        return real_concatenate(arrays, *args, **kwargs)

    def release(array):
        if isinstance(array, np.memmap) and array.shape[0] == 1 and int(array[0, 0]) in copied:
            released_after_copy.append(int(array[0, 0]))
        real_release(array)

    monkeypatch.setattr(sample_batches.np, "concatenate", concatenate)
    monkeypatch.setattr(data_files, "release_pages", release)
    samples = [Batch({"x": mapped[i : i + 1]}, 1, None) for i in range(8)]
    joined = list(grouped_samples(samples, lambda: 4))
    assert [b.samples for b in joined] == [4, 4]
    assert sorted(set(released_after_copy)) == list(range(8))


def test_first_samples_cuts_the_stream_inside_a_batch_and_replays():
    x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    specs = [InputSpec("x", np.float32, ("N", 2))]
    whole = data.from_arrays({"x": x}, specs, labels=None, where="x.npz")
    first = sample_batches.first_samples(whole, specs, 5)
    for _ in range(2):  # read twice, as a second pass over the data would
        batches = list(first.batches())
        assert sum(b.samples for b in batches) == 5
        np.testing.assert_array_equal(np.concatenate([b.feed["x"] for b in batches]), x[:5])
    assert "first 5 samples" in first.description
