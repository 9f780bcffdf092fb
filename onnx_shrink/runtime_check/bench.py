"""Latency, throughput, memory and size of models on onnxruntime.

Two models are timed *alternately in one process* so their ratio survives a noisy machine:
both see the same frequency scaling and background load, and the median of per-pair ratios
is reported. Session peak memory is measured in a child process (``memory_probe``), so one
model's allocations cannot hide another's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_shrink.compiler import io
from onnx_shrink.errors import DataError, ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import progress as phases
from onnx_shrink.runtime_check import sessions
from onnx_shrink.runtime_check.progress import Progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one batch size and thread count (milliseconds)."""

    batch: int
    threads: int | None
    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    """samples per second at the median latency"""
    timings_ms: tuple[float, ...]

    @classmethod
    def from_seconds(
        cls, seconds: Sequence[float], batch: int, threads: int | None
    ) -> LatencyStats:
        ms = np.asarray(seconds) * 1e3
        p50 = float(np.percentile(ms, 50))
        return cls(
            batch=batch,
            threads=threads,
            runs=len(ms),
            mean_ms=float(ms.mean()),
            p50_ms=p50,
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            throughput=batch / (p50 / 1e3) if p50 > 0 else float("inf"),
            timings_ms=tuple(float(x) for x in ms),
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


SLOWER_RATIO = 1.10
"""A paired latency ratio from which the check says the candidate is slower (below it, a
2-core machine's noise can give a ratio of 1.05 to a model no slower)."""
SLOWER_SHARE = 0.75
"""The share of pairs the candidate must lose, too, for the check to say it is slower: two
copies of one file on a loaded 2-core machine read 1.20x, each losing about half."""


@dataclasses.dataclass(frozen=True)
class LatencyComparison:
    """Both models' latency measured alternately, and the median candidate/reference ratio."""

    reference: LatencyStats
    candidate: LatencyStats
    ratio: float
    pairs_asked: int = 0
    """the pairs asked for; more than ``reference.runs`` where a time budget cut them"""
    slower_share: float | None = None
    """the share of pairs in which the candidate ran slower: near 0.5 for two models as
    fast, where a loaded machine can still push the median ratio past 1.1"""

    @property
    def too_few_pairs(self) -> bool:
        """Whether fewer pairs were timed than any verdict needs (``--runs 1``: one pair read
        1.45x on MTCNN's O-Net, whose profile then showed the candidate faster, 6.6 against
        8.3 ms)."""
        return self.reference.runs < MIN_TIMED_PAIRS

    @property
    def slower(self) -> bool:
        """The verdict that the candidate is slower: a ratio of ``SLOWER_RATIO`` or more, in
        at least ``SLOWER_SHARE`` of at least ``MIN_TIMED_PAIRS`` pairs."""
        lost = self.slower_share is None or self.slower_share >= SLOWER_SHARE
        return self.ratio >= SLOWER_RATIO and lost and not self.too_few_pairs

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Bytes on disk (model plus external data) and after zlib, where sparsity pays at rest."""

    bytes_on_disk: int
    zipped_bytes: int
    zipped_estimated: bool = False
    """past ``zipped.ZIP_EXACT_BYTES``, ``zipped_bytes`` comes from a sample (shown with ≈)"""

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def zipped_text(self, fmt: Callable[[float], str]) -> str:
        """The zipped bytes as ``fmt`` writes them, marked ≈ where they come from a sample."""
        return ("≈ " if self.zipped_estimated else "") + fmt(self.zipped_bytes)


@dataclasses.dataclass(frozen=True)
class BenchmarkReport:
    """One model's latency grid, session peak memory and size."""

    model: str
    provider: str
    size: ModelSize
    peak_memory_bytes: int | None
    latency: tuple[LatencyStats, ...]
    inputs: str
    peak_memory_batch: int | None = None
    """the batch size the session's peak memory was measured at: the largest asked for"""

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# zlib level 1: ~4x faster than the default 6 and within a few % of it on weights.
ZIP_LEVEL = 1


def time_run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    """Seconds one ``session.run`` takes on ``feed`` (the session's inputs only:
    ``sessions.declared_feed``, filtered once before the timing loop, not per run)."""
    started = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - started


def measure_latency(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 50,
    warmup: int = 5,
    batch: int = 1,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LatencyStats:
    """Latency of ``runs`` runs after ``warmup`` untimed ones; ``progress`` hears the timed
    runs done after each."""
    feed = sessions.declared_feed(session, feed)
    for _ in range(warmup):
        time_run(session, feed)
    seconds = []
    for _ in range(runs):
        seconds.append(time_run(session, feed))
        if progress is not None:
            progress(len(seconds))
    return LatencyStats.from_seconds(seconds, batch, threads)


MIN_TIMED_PAIRS = 5
"""Pairs ``compare_latency`` times at least, whatever its time budget"""


def compare_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 30,
    warmup: int = 3,
    batch: int = 1,
    threads: int | None = None,
    max_seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyComparison:
    """Time both sessions in ``runs`` pairs after ``warmup`` runs of each, on ``feed`` fitted
    to each session's inputs (``sessions.fitted_feed``: a candidate may take float16); the
    ratio is the median of the pairs' candidate / reference.

    Each timed run follows an untimed run of the same session. onnxruntime's worker threads
    spin on after a run, so the first run after the other session's is slowed by its threads
    (up to 1.8x on 2 cores): timing it made pair ratios bimodal and their median depend on
    how many of each kind there were (two sessions of one model measured 0.79). Timed after a
    settling run, each model runs as it would back to back, and the order within a pair
    alternates so neither always inherits the cache. Create both sessions with
    ``sessions.create_session(stop_spinning=True)``: the settling run does not keep the idle
    session's threads from spinning through the other's timed run (two copies of a 12 ms face
    landmark model read 0.80-0.99x, of a 20 us wake word model 0.46x-1.77x).

    ``max_seconds`` (None: no limit) bounds the timing on slow runs: the warm-up stops once it
    took a quarter of it (after one pair), the timed pairs once they took all of it, settling
    runs included (after ``MIN_TIMED_PAIRS``, or ``runs`` if fewer). The stats say how many
    runs were timed. ``progress`` gets (pairs timed, pairs it will time as projected from the
    budget and the pairs so far) after each pair."""
    cand_feed = sessions.fitted_feed(candidate, feed)
    feed = sessions.fitted_feed(reference, feed)
    spent = 0.0
    for _ in range(warmup):
        spent += time_run(reference, feed) + time_run(candidate, cand_feed)
        if max_seconds is not None and spent >= max_seconds / 4:
            break
    ref_times: list[float] = []
    cand_times: list[float] = []
    timed = 0.0
    turns = [(reference, feed, ref_times), (candidate, cand_feed, cand_times)]
    for i in range(runs):
        for session, inputs, times in turns if i % 2 == 0 else turns[::-1]:
            settling = time_run(session, inputs)
            times.append(time_run(session, inputs))
            timed += settling + times[-1]
        over = max_seconds is not None and timed >= max_seconds
        if progress is not None:
            progress(i + 1, _pairs_expected(i + 1, runs, timed, max_seconds, over))
        if over and i + 1 >= MIN_TIMED_PAIRS and i + 1 < runs:
            logger.info(
                "latency: %d of %d runs of each model timed: they took %.0f s, past the %.0f s "
                "budget (--runs N, or latency_seconds=None, times all of them)",
                i + 1,
                runs,
                timed,
                max_seconds,
            )
            break
    ratios = [c / r if r > 0 else float("nan") for r, c in zip(ref_times, cand_times, strict=True)]
    return LatencyComparison(
        reference=LatencyStats.from_seconds(ref_times, batch, threads),
        candidate=LatencyStats.from_seconds(cand_times, batch, threads),
        ratio=statistics.median(ratios),
        pairs_asked=runs,
        slower_share=sum(c > r for r, c in zip(ref_times, cand_times, strict=True))
        / max(len(ratios), 1),
    )


def _pairs_expected(
    done: int, runs: int, seconds: float, max_seconds: float | None, over: bool
) -> int:
    """The pairs ``compare_latency`` will time, ``done`` of them having taken ``seconds``."""
    if max_seconds is None or done >= runs:
        return runs
    if over:
        return max(done, min(runs, MIN_TIMED_PAIRS))
    fit = math.ceil(max_seconds * done / max(seconds, 1e-9))  # the pair past it is timed
    return max(done + 1, min(runs, max(MIN_TIMED_PAIRS, fit)))


def resize_batch(
    feed: Mapping[str, np.ndarray], specs: Sequence[data_mod.InputSpec], batch: int
) -> dict[str, np.ndarray]:
    """``feed`` with every dynamic first dim set to ``batch`` (slicing or repeating samples)."""
    result = {}
    for spec in specs:
        array = feed[spec.name]
        if spec.batch_axis and array.ndim and array.shape[0] != batch:
            reps = -(-batch // array.shape[0])
            array = np.concatenate([array] * reps, axis=0)[:batch]
        result[spec.name] = array
    return result


def model_size(model: sessions.ModelBytesOrPath) -> ModelSize:
    """Bytes on disk and zlib-compressed bytes of a model file (with external data) or bytes."""
    if isinstance(model, bytes):
        return ModelSize(len(model), *io.zipped_size(model, ZIP_LEVEL))
    files = io.model_files(model)
    return ModelSize(sum(os.path.getsize(p) for p in files), *io.zipped_size(files, ZIP_LEVEL))


def session_peak_memory(
    model: str | os.PathLike, feed: Mapping[str, np.ndarray], provider: str = "cpu"
) -> int:
    """Peak resident memory a session adds to a fresh process, creating it and running once.

    Measured in a child process (``python -m onnx_shrink.runtime_check.memory_probe``): the
    maximum RSS after creating the session and running ``feed``, minus the maximum RSS after
    importing onnxruntime and reading the inputs.
    """
    shapes = {name: [list(a.shape), a.dtype.str] for name, a in feed.items()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnx_shrink.runtime_check.memory_probe",
            str(model),
            provider,
            json.dumps(shapes),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ShrinkError(f"{model}: measuring session memory failed: {tail}")
    return int(json.loads(result.stdout)["session_peak_bytes"])


def max_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def benchmark(
    model: str | os.PathLike,
    *,
    data: str | Path | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch_sizes: Sequence[int] = (1,),
    threads: Sequence[int | None] = (None,),
    runs: int = 50,
    warmup: int = 5,
    provider: str = "cpu",
    memory: bool = True,
    progress: Progress | None = None,
) -> BenchmarkReport:
    """Latency for every (batch size, threads), session peak memory and size of one model.
    ``progress`` hears the phases (``progress.SESSION``, ``TIMED_RUNS`` counted over the
    whole grid, ``SESSION_MEMORY``)."""
    report = progress or phases.ignored
    report(phases.SESSION, 0)
    specs = data_mod.specs_from_model(io.load(model))
    dataset = data_mod.prepare(specs, data, input_shapes)
    if dataset.whole_samples and set(batch_sizes) != {1}:
        raise DataError(
            f"{dataset.description}: samples given whole (one more axis than the model's "
            "input) leave the input's first axis the sample's own, not a batch: only batch "
            "size 1 can be run (give samples on the input's first axis to time batches)"
        )
    failed = f"{model} failed on its inputs"
    session = sessions.create_session(model, provider=provider, threads=threads[0])
    if data is None:  # the defaults of synthetic dims grown where the model fails on them
        dataset = sessions.synthetic_that_runs(
            session,
            dataset,
            specs,
            input_shapes,
            failed=failed,
            label=str(model),
            purpose="for the benchmark",
        )
    base = dataset.first_feed()

    def batched(batch: int) -> dict[str, np.ndarray]:
        return dict(base) if dataset.whole_samples else resize_batch(base, specs, batch)

    hint = data_mod.unfit_hint(dataset)
    grid: list[LatencyStats] = []
    timed = runs * len(threads) * len(batch_sizes)
    for index, thread_count in enumerate(threads):
        if index:  # the first thread count's session is the one made above
            report(phases.SESSION, 0)
            session = sessions.create_session(model, provider=provider, threads=thread_count)
        for batch in batch_sizes:
            before = len(grid) * runs
            report(phases.TIMED_RUNS, before, timed)
            feed = batched(batch)
            # The first warm-up run fails clearly (the timed ones would raise onnxruntime's).
            sessions.run(session, feed, failed=failed, hint=hint)
            grid.append(
                measure_latency(
                    session,
                    feed,
                    runs=runs,
                    warmup=max(warmup - 1, 0),
                    batch=batch,
                    threads=thread_count,
                    progress=lambda done, before=before: report(
                        phases.TIMED_RUNS, before + done, timed
                    ),
                )
            )
    # At the largest batch asked for: the first feed's own batch (a whole .npz) is no row's.
    largest = max(batch_sizes)
    peak = None
    if memory:
        report(phases.SESSION_MEMORY, 0)
        peak = session_peak_memory(model, batched(largest), provider)
    return BenchmarkReport(
        model=str(model),
        provider=provider,
        size=model_size(model),
        peak_memory_bytes=peak,
        latency=tuple(grid),
        # One sample's dims: the rows say the batch (a 16-sample .npz read "16x32" beside
        # rows of batches 1 and 8).
        inputs=data_mod.describe_feed(batched(1)),
        peak_memory_batch=largest if memory else None,
    )
