"""numpy's BLAS kept to one thread while onnxruntime runs beside it.

numpy's BLAS (OpenBLAS) keeps a pool of threads that spin while they wait for work, as
onnxruntime's do. Where numpy folds one run's outputs while onnxruntime computes the next
(``collect_runs.overlapped_runs``), the two pools fight for the same cores: the sensitivity
report's comparisons on YOLOv8n (dot products of 46,200-value outputs, 8 copies a run) took
5.2 of its 42 s beside two onnxruntime runs, 0.3 s with one BLAS thread. The dot products
of one output are too short for a second thread to pay anyway.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

_LOCK = threading.Lock()
_holders = 0
_limiter = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside, restored when the last of the overlapping holders leaves
    (generators of runs may be closed in any order, which plain nesting would not survive)."""
    global _holders, _limiter
    with _LOCK:
        if _holders == 0:
            _limiter = threadpool_limits(limits=1, user_api="blas")
        _holders += 1
    try:
        yield
    finally:
        with _LOCK:
            _holders -= 1
            if _holders == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None
