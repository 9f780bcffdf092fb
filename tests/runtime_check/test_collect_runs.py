"""The statistics session's runs: how many at once, on how many threads, yielded in order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import collect_runs, sessions
from onnx_shrink.runtime_check.data import Batch
from tests.helpers import parse

IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, M] x) => (float[N, M] y) {
  y = Identity(x)
}
"""


@pytest.mark.parametrize(("cores", "in_flight", "threads"), [(1, 1, None), (2, 2, 1), (16, 2, 15)])
def test_two_runs_go_at_once_on_a_cpu_sharing_its_cores(monkeypatch, cores, in_flight, threads):
    monkeypatch.setattr(collect_runs, "_cores", lambda: cores)
    made = []
    original = sessions.create_session
    monkeypatch.setattr(
        sessions, "create_session", lambda *a, **k: made.append(k) or original(*a, **k)
    )
    assert collect_runs.parallel_runs("cpu") == in_flight
    collect_runs.open_session(io.load(parse(IDENTITY)), "cpu")
    assert made[0]["threads"] == threads and made[0]["prepack"] is False


def test_statistics_run_in_priority_order():
    """In onnxruntime's default order a statistic ran long after its tensor was made, which
    stayed alive until then: PicoDet at 800x608 held 1.46 GB over its session, 0.16 GB in
    priority order; YOLOv8n's calibration on 32 samples took 435 MiB, now 306."""
    import onnxruntime as ort

    session = collect_runs.open_session(io.load(parse(IDENTITY)), "cpu")
    assert session.get_session_options().execution_order == ort.ExecutionOrder.PRIORITY_BASED


class _Session:
    """A real session where sample ``i``'s run waits (up to 10 s) until sample
    ``wait_for[i]``'s run has finished: it only returns if the two runs overlap, and then
    finishes after it. Records the samples each run started and finished, in order; raises
    on ``fail_at``."""

    def __init__(self, wait_for=None, fail_at=None):
        self.session = sessions.create_session(io.to_bytes(io.load(parse(IDENTITY))))
        self.wait_for = wait_for or {}
        self.fail_at = fail_at
        self.started: set[int] = set()
        self.done: dict[int, threading.Event] = {}
        self.finished: list[int] = []
        self.lock = threading.Lock()

    def _done(self, sample: int) -> threading.Event:
        with self.lock:
            return self.done.setdefault(sample, threading.Event())

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, names, feed):
        first = int(feed["x"][0, 0])
        with self.lock:
            self.started.add(first)
        if first in self.wait_for:
            other = self.wait_for[first]
            assert self._done(other).wait(10), f"sample {first}'s run waited for {other}'s"
        if first == self.fail_at:
            raise RuntimeError("refused")
        outputs = self.session.run(names, feed)
        with self.lock:
            self.finished.append(first)
        self._done(first).set()
        return outputs


def _batches(count, width=lambda i: 4):
    return [Batch({"x": np.full((1, width(i)), i, np.float32)}, 1, None) for i in range(count)]


def _first_samples(runs):
    return [int(outputs["y"][0, 0]) for _, outputs in runs]


def test_runs_at_once_finish_out_of_order_and_are_yielded_in_order():
    session = _Session(wait_for={0: 1})  # sample 0's run finishes after sample 1's
    runs = collect_runs.overlapped_runs(session, _batches(12), ["y"], {}, in_flight=2)
    assert _first_samples(runs) == list(range(12))
    assert session.finished.index(1) < session.finished.index(0)


def test_single_samples_of_unequal_shapes_still_run_two_at_once_while_joining():
    """Joining asked for, but no two samples share a shape: every batch is one sample, and
    nothing waits for a joined run to prove itself."""
    session = _Session(wait_for={0: 1, 2: 3})
    batches = _batches(8, width=lambda i: 4 + i)
    joining = collect_runs.Joining(size=8)
    runs = collect_runs.overlapped_runs(session, batches, ["y"], {}, joining, in_flight=2)
    assert _first_samples(runs) == list(range(8))


def test_a_failed_run_raises_in_order_and_cancels_the_runs_not_started():
    session = _Session(fail_at=3)
    runs = collect_runs.overlapped_runs(session, _batches(40), ["y"], {}, in_flight=2)
    seen = []
    with pytest.raises(ShrinkError, match="refused"):
        for _, outputs in runs:
            seen.append(int(outputs["y"][0, 0]))
    assert seen == [0, 1, 2]
    assert max(session.started) <= 6  # in flight and queued at most; none of the rest


def test_a_mapped_samples_pages_go_back_once_its_run_has_read_them(tmp_path, monkeypatch):
    """Released when the next sample was cut, a sample still being run was faulted in again
    and stayed resident: two runs at once then held a whole batch of the file."""
    path = tmp_path / "calib.npz"
    data_files.save_npz(path, {"x": np.arange(6, dtype=np.float32)[:, None].repeat(4, axis=1)})
    mapped = data_files.load_npz(path)["x"]
    assert isinstance(mapped, np.memmap)
    session = _Session(wait_for={0: 1})
    released_after_run = {}
    real_release = data_files.release_pages

    def spy(array):
        if isinstance(array, np.memmap) and array.shape[0] == 1:
            sample = int(array[0, 0])
            ran = sample in session.finished
            released_after_run[sample] = released_after_run.get(sample, True) and ran
        real_release(array)

    monkeypatch.setattr(data_files, "release_pages", spy)
    batches = [Batch({"x": mapped[i : i + 1]}, 1, None) for i in range(6)]
    runs = collect_runs.overlapped_runs(session, batches, ["y"], {}, in_flight=2)
    assert _first_samples(runs) == list(range(6))
    assert released_after_run == dict.fromkeys(range(6), True)
