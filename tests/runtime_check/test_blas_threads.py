"""numpy's BLAS on one thread while onnxruntime runs beside it (its pool spun on the same
cores), restored after, whatever order overlapping holders leave in."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from onnx_shrink.runtime_check import blas_threads, collect_runs, sessions
from onnx_shrink.runtime_check.data import Batch
from tests.helpers import parse

IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, M] x) => (float[N, M] y) {
  y = Identity(x)
}
"""


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """At least two BLAS threads to begin with (one core: one already, nothing to see)."""
    from threadpoolctl import threadpool_limits

    if not _blas_threads():
        pytest.skip("numpy reports no BLAS thread pool")
    with threadpool_limits(limits=2, user_api="blas"):
        yield _blas_threads()


def test_the_last_holder_to_leave_restores_the_threads(two_blas_threads):
    first, second = blas_threads.one_blas_thread(), blas_threads.one_blas_thread()
    first.__enter__()
    assert set(_blas_threads()) == {1}
    second.__enter__()
    first.__exit__(None, None, None)  # out of order: the second still holds
    assert set(_blas_threads()) == {1}
    second.__exit__(None, None, None)
    assert _blas_threads() == two_blas_threads


def test_runs_at_once_hold_blas_to_one_thread_while_their_outputs_are_folded(
    two_blas_threads,
):
    session = sessions.create_session(parse(IDENTITY).SerializeToString())
    batches = [Batch({"x": np.full((1, 4), i, np.float32)}, 1, None) for i in range(4)]
    seen = [
        _blas_threads()
        for _ in collect_runs.overlapped_runs(session, batches, ["y"], {}, in_flight=2)
    ]
    assert len(seen) == 4 and all(set(threads) == {1} for threads in seen)
    assert _blas_threads() == two_blas_threads
    # Closed early (an error in the consumer, a reader stopped): restored too.
    runs = collect_runs.overlapped_runs(session, batches, ["y"], {}, in_flight=2)
    next(runs)
    assert set(_blas_threads()) == {1}
    runs.close()
    assert _blas_threads() == two_blas_threads
