"""Running the statistics session over samples: overlapped with Python's folding, two runs
at once on the CPU, joined samples split again when the model refuses them.

* Two runs go at once on a CPU with two cores or more (``parallel_runs``), sharing the
  session's intra-op threads: a calibration run is many small kernels, which onnxruntime's
  threads share poorly within one run (PP-OCRv4 rec: 26-31 against 19 ms a sample on two
  cores). Results are yielded in sample order, so nothing depends on which run finishes
  first.
* While they run, Python folds the run before: onnxruntime runs without Python's lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.io import data_files, large_tensors
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import blas_threads, sample_batches, sessions
from onnx_shrink.runtime_check import collect_graph as cg
from onnx_shrink.runtime_check import data as data_mod

logger = logging.getLogger(__name__)


def parallel_runs(provider: str) -> int:
    """Runs a statistics session does at once: two on a CPU with two cores or more, else
    one."""
    return (
        2 if sessions.resolve_provider(provider) == "CPUExecutionProvider" and _cores() >= 2 else 1
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, not the machine's
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_threads(provider: str) -> int | None:
    """Intra-op threads of a statistics session (None: onnxruntime's default): with
    ``parallel_runs`` at once, ``cores - in_flight`` pool threads plus the callers fill the
    cores (one thread a run on two cores)."""
    in_flight = parallel_runs(provider)
    return max(1, _cores() - in_flight + 1) if in_flight > 1 else None


def open_session(model: ir.Model, provider: str):
    """A session of the instrumented ``model`` for ``parallel_runs`` runs at once, of
    ``session_threads`` threads: concurrent runs share the session's intra-op pool, and each
    calling thread works in its own run's parallel loops."""
    # Weights are handed over in place: no serialized copy, no temporary file, any size; and
    # not packed, which copies them (a 0.6 GB encoder's calibration peak: 660 -> 290 MiB).
    source = large_tensors.session_source(model)
    threads = session_threads(provider)
    # Each statistic's nodes read a tensor right after it is made (``collect_graph._beside``)
    # and run then in the priority order; in onnxruntime's default order they ran late, and
    # every tensor they read lived until then (PicoDet at 800x608, ranges only, two runs at
    # once: 1.46 GB over the session, 0.16 GB in priority order).
    return sessions.create_session(
        source, provider=provider, prepack=False, threads=threads, priority_order=True
    )


@dataclasses.dataclass
class Joining:
    """How many single samples a run joins (``grouped_samples``); set to 1 for good when
    the model fails on a joined run. ``proven``: a joined run has succeeded."""

    size: int
    proven: bool = False


def overlapped_runs(
    session,
    batches: Iterable[data_mod.Batch],
    outputs: Sequence[str],
    extra: dict[str, np.ndarray],
    joining: Joining | None = None,
    in_flight: int = 1,
    first_sample: int = 0,
) -> Iterator[tuple[data_mod.Batch, dict[str, np.ndarray]]]:
    """Yield (batch, outputs) in the batches' order, the next ``in_flight`` batches' runs
    already going while this one's outputs are folded: onnxruntime runs without Python's
    lock, so its work and numpy's counting overlap instead of taking turns.

    ``joining`` given: each batch is single samples joined by ``grouped_samples`` (their
    number is fed as ``RUN_SAMPLES``); a batch the model fails on runs again one sample at a
    time, as does every later batch (yielding each sample). None: each batch runs as it is,
    one sample as the histograms' lattice sees it. Until a joined run has succeeded, a joined
    batch runs alone: a model that refuses joined samples fails once, whatever the timing.
    An error or an early close cancels the runs not yet started. ``first_sample``: the index
    of the batches' first sample in the pass (fed, negated, as ``MINUS_FIRST_SAMPLE`` where
    ``extra`` has it, each run its own first sample's).
    """

    def room(batch: data_mod.Batch) -> int:  # submitted, not yet yielded: in_flight + a queued
        joined = joining is not None and batch.samples > 1 and joining.size > 1
        return 1 if joined and not joining.proven else in_flight + 1

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=in_flight)
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    first = first_sample
    # numpy folds runs while onnxruntime computes: its BLAS threads would spin on their cores.
    with contextlib.ExitStack() as stack:
        stack.enter_context(blas_threads.one_blas_thread())
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        for batch in batches:
            while len(pending) >= room(batch):
                yield from pending.popleft().result()
            run = functools.partial(_run_joined, session, batch, extra, outputs, joining, first)
            pending.append(pool.submit(run))
            first += batch.samples
        while pending:
            yield from pending.popleft().result()


def _run_joined(session, batch, extra, outputs, joining: Joining | None, first: int = 0):
    """[(batch, outputs)], or each of its samples' after a failed joined run (``first``: the
    index of the batch's first sample)."""

    def run_one(
        one: data_mod.Batch, first: int = first
    ) -> tuple[data_mod.Batch, dict[str, np.ndarray]]:
        told = extra
        if cg.RUN_SAMPLES in extra:  # where its samples start, and how many it joins
            told = {**extra, cg.MINUS_FIRST_SAMPLE: np.array([-first], np.int64)}
            if joining is not None:
                told[cg.RUN_SAMPLES] = np.array([one.samples], np.int64)
        result = run(session, one.feed, told, outputs)
        # The run has read its inputs: a memory-mapped sample's pages go back now. Handed
        # back when the next sample was cut, they were faulted in again by this run, still
        # going, and stayed until the end of the dataset's batch (64 samples of det: 77 MB).
        for array in one.feed.values():
            if array.shape[:1] == (one.samples,):  # not an input every run shares whole
                data_files.release_pages(array)
        return one, result

    single = joining is None or batch.samples == 1
    if single or joining.size > 1:  # a batch joined before an earlier one failed is not tried
        try:
            result = [run_one(batch)]
        except ShrinkError as e:
            if single:
                raise
            sample_batches.warn_alone("statistics", batch.samples, e)
            joining.size = 1
        else:
            if not single:
                joining.proven = True
            return result
    alone = sample_batches.split(batch, set(batch.feed))
    return [run_one(one, first + index) for index, one in enumerate(alone)]


def run(session, feed, extra, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Run one sample's ``feed`` (with the statistics' own inputs ``extra``)."""
    return sessions.run(
        session,
        feed,
        outputs,
        extra=extra,
        failed="the model failed on a calibration sample",
        hint="Give samples it accepts (--calibration / --data), or other synthetic shapes with "
        "--input-shape",
    )
