"""``compare_latency``'s schedule: what it times must not depend on which session ran last.

onnxruntime's worker threads spin on after a run, so a session's first run after the other
session's is slower. These sessions simulate that on a fake clock: a run costs its model's
time, times ``SWITCH_PENALTY`` when the other session ran last. No wall-clock timing.
"""

from __future__ import annotations

import sys

import pytest

from onnx_shrink.runtime_check import bench

SWITCH_PENALTY = 1.8


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.last: object = None


class _Session:
    """A session whose runs advance ``clock`` by ``cost`` (more after the other one's run)."""

    def __init__(self, clock: _Clock, cost: float) -> None:
        self.clock, self.cost, self.runs = clock, cost, 0

    def get_inputs(self):
        return []

    def run(self, outputs, feed):
        switched = self.clock.last is not None and self.clock.last is not self
        self.clock.now += self.cost * (SWITCH_PENALTY if switched else 1.0)
        self.clock.last = self
        self.runs += 1
        return []


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock.now)
    return clock


@pytest.mark.parametrize("runs", [5, 6, 30, 31])
@pytest.mark.parametrize("speedup", [1.0, 0.5, 2.0])
def test_the_ratio_is_the_models_whatever_ran_before(clock, runs, speedup):
    """Timing a run right after the other session's made same-model pairs read 0.79x (their
    ratios split into ~0.55 and ~1.8, and the median fell between)."""
    reference, candidate = _Session(clock, 0.010), _Session(clock, 0.010 * speedup)
    result = bench.compare_latency(reference, candidate, {}, runs=runs)
    assert result.ratio == pytest.approx(speedup)
    assert result.reference.runs == result.candidate.runs == runs
    assert result.reference.p50_ms == pytest.approx(10.0)


def test_the_time_budget_counts_the_settling_runs(clock):
    reference, candidate = _Session(clock, 1.0), _Session(clock, 1.0)
    # 4 s a pair (2 runs of each model): a 20 s budget is spent by the 5th pair.
    result = bench.compare_latency(reference, candidate, {}, runs=30, warmup=0, max_seconds=20)
    assert result.reference.runs == bench.MIN_TIMED_PAIRS == 5
    assert reference.runs == candidate.runs == 2 * bench.MIN_TIMED_PAIRS


class _NoisySession(_Session):
    """Runs whose cost alternates between two values: another load on the machine."""

    def __init__(self, clock: _Clock, costs: list[float]) -> None:
        super().__init__(clock, costs[0])
        self.costs = costs

    def run(self, outputs, feed):
        self.cost = self.costs[self.runs % len(self.costs)]
        return super().run(outputs, feed)


def test_the_share_of_pairs_the_candidate_loses_is_counted(clock):
    slower = bench.compare_latency(_Session(clock, 1.0), _Session(clock, 1.2), {}, runs=8)
    assert slower.slower_share == 1.0
    # The candidate's timed runs (every other run, after a settling one) cost 1.0, 1.5, 1.5
    # and 0.9 in turn: slower in half the pairs, with a median ratio of 1.25.
    noisy = _NoisySession(clock, [1.0, 1.0, 1.0, 1.5, 1.0, 1.5, 1.0, 0.9])
    result = bench.compare_latency(_Session(clock, 1.0), noisy, {}, runs=8, warmup=0)
    assert result.ratio == pytest.approx(1.25) and result.slower_share == 0.5


def test_progress_counts_the_pairs_the_budget_allows(clock, monkeypatch):
    """The check's status line counts the pairs out of those that will be timed: 4 s a pair
    and a 30 s budget time 8 of the 30 asked, and each report says 8 from the first on."""
    monkeypatch.setattr(sys.modules[__name__], "SWITCH_PENALTY", 1.0)  # runs of one cost
    reports = []
    result = bench.compare_latency(
        _Session(clock, 1.0),
        _Session(clock, 1.0),
        {},
        runs=30,
        warmup=0,
        max_seconds=30,
        progress=lambda done, total: reports.append((done, total)),
    )
    assert result.reference.runs == 8
    assert reports == [(done, 8) for done in range(1, 9)]
    reports.clear()
    bench.compare_latency(
        _Session(clock, 1.0),
        _Session(clock, 1.0),
        {},
        runs=6,
        progress=lambda *r: reports.append(r),
    )
    assert reports == [(done, 6) for done in range(1, 7)]
