"""The statistics session's runs: how many at once, on how many threads, yielded in order."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.runtime_check import collect_runs, sessions
from onnx_shrink.runtime_check.data import Batch
from tests.helpers import parse

IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  y = Identity(x)
}
"""


@pytest.mark.parametrize(("cores", "in_flight", "threads"), [(1, 1, None), (2, 2, 1), (16, 2, 8)])
def test_two_runs_go_at_once_on_a_cpu_each_on_half_the_cores(
    monkeypatch, cores, in_flight, threads
):
    monkeypatch.setattr(collect_runs, "_cores", lambda: cores)
    made = []
    original = sessions.create_session
    monkeypatch.setattr(
        sessions, "create_session", lambda *a, **k: made.append(k) or original(*a, **k)
    )
    assert collect_runs.parallel_runs("cpu") == in_flight
    collect_runs.open_session(io.load(parse(IDENTITY)), "cpu")
    assert made[0]["threads"] == threads and made[0]["prepack"] is False


def test_runs_at_once_are_yielded_in_the_samples_order():
    """Runs that finish out of order (random delays) still come back in order."""
    session = sessions.create_session(io.to_bytes(io.load(parse(IDENTITY))))
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.01) for _ in range(24)]
    finished: list[int] = []
    lock = threading.Lock()
    run = session.run

    def slow(names, feed):
        index = int(feed["x"][0, 0])
        time.sleep(delays[index])
        with lock:
            finished.append(index)
        return run(names, feed)

    session.run = slow
    batches = [Batch({"x": np.full((1, 4), i, np.float32)}, 1, None) for i in range(24)]
    yielded = [
        int(outputs["y"][0, 0])
        for _, outputs in collect_runs.overlapped_runs(session, batches, ["y"], {}, in_flight=2)
    ]
    assert yielded == list(range(24))
    assert finished != sorted(finished)  # the runs did overlap and overtake each other
