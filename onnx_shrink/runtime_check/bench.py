"""Latency of two models timed alternately in one process, so their ratio survives noise.

Running reference and candidate back to back, many times, exposes both to the same machine
state (frequency scaling, other load); the median of per-pair ratios is the figure reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort


@dataclasses.dataclass(frozen=True)
class LatencyComparison:
    """Median latencies (ms) of both models and the median candidate/reference ratio."""

    reference_ms: float
    candidate_ms: float
    ratio: float
    runs: int

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def time_run(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
    """Seconds one ``session.run`` takes on ``feed``."""
    started = time.perf_counter()
    session.run(None, dict(feed))
    return time.perf_counter() - started


def compare_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 20,
    warmup: int = 3,
) -> LatencyComparison:
    """Time both sessions alternately ``runs`` times after ``warmup`` runs of each."""
    for _ in range(warmup):
        time_run(reference, feed)
        time_run(candidate, feed)
    ref_times, cand_times, ratios = [], [], []
    for i in range(runs):
        # Alternate which model goes first so neither always inherits a warm cache.
        if i % 2:
            cand, ref = time_run(candidate, feed), time_run(reference, feed)
        else:
            ref, cand = time_run(reference, feed), time_run(candidate, feed)
        ref_times.append(ref)
        cand_times.append(cand)
        ratios.append(cand / ref if ref > 0 else float("nan"))
    return LatencyComparison(
        reference_ms=statistics.median(ref_times) * 1e3,
        candidate_ms=statistics.median(cand_times) * 1e3,
        ratio=statistics.median(ratios),
        runs=runs,
    )
