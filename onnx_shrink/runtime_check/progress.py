"""Progress reports of runs over data: what the statistics engine, the sensitivity report,
lowrank's output-error trials and the check tell their caller after each run (``shrink``'s
``on_calibration`` gets them, through ``calibration_hooks.reporting``)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called after every run with (phase, samples done), and the phase's samples in all
    where they are not the whole dataset's (a run over its first samples); the caller knows
    the dataset's (``calibration_hooks.reporting``)."""

    def __call__(self, phase: str, done: int, total: int | None = None) -> None: ...


STATISTICS, HISTOGRAMS, NONFINITE_RANGES = "statistics", "histograms", "non-finite ranges"
PHASES = (STATISTICS, HISTOGRAMS, NONFINITE_RANGES)
"""The statistics engine's phases: calibration runs (others' runs report phases of their
own through the same callback: the sensitivity report's)."""

LOAD, OUTPUTS, LAYERS = "loading both models", "outputs", "where the error starts"
LATENCY, PROFILE = "latency", "where the time goes"
"""A comparison's phases: opening both models' sessions, the runs that compare their
outputs (all ``checker.compare`` reports), the layer localization (``--layers``), the timed
pairs and the profile of a slower candidate."""

SESSION, TIMED_RUNS, SESSION_MEMORY = "loading the model", "timed runs", "session memory"
"""A benchmark's phases (``bench.benchmark``): opening a session (once per thread count),
the timed runs of every (batch size, threads) in all, and the session's peak memory,
measured in a process of its own."""

CHECK = "check"
CHECK_LOAD, CHECK_OUTPUTS, CHECK_LAYERS, CHECK_LATENCY, CHECK_PROFILE = (
    f"{CHECK}: {phase}" for phase in (LOAD, OUTPUTS, LAYERS, LATENCY, PROFILE)
)
"""The check's phases, as ``checker.check`` reports them."""

COUNTS = {
    LOAD: "",
    LATENCY: "pair",
    LAYERS: "",
    PROFILE: "",
    SESSION: "",
    TIMED_RUNS: "run",
    SESSION_MEMORY: "",
}
"""What a phase (its last part: "check: latency") counts where it is not samples ("":
nothing, a phase reported once as it starts)."""


def counts(phase: str) -> str:
    """What ``phase``'s done and total count: "sample", "pair", or "" (nothing)."""
    return COUNTS.get(_own(phase), "sample")


def calibrates(phase: str) -> bool:
    """Whether ``phase`` is one of the statistics engine's (``PHASES``), after a purpose or
    not ("bias correction: statistics")."""
    return _own(phase) in PHASES


def _own(phase: str) -> str:
    """``phase`` without the purposes ``named`` put before it ("check: latency": latency)."""
    return phase.rsplit(": ", 1)[-1]


def ignored(phase: str, done: int, total: int | None = None) -> None:
    """A ``Progress`` that tells no one: for a caller that gave none."""


def named(progress: Progress | None, purpose: str) -> Progress | None:
    """``progress`` with each phase named after ``purpose`` ("the hint: statistics"), where
    there is one."""
    if progress is None or not purpose:
        return progress

    def report(phase: str, done: int, total: int | None = None) -> None:
        progress(f"{purpose}: {phase}", done, total)

    return report
