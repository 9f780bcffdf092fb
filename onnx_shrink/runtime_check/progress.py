"""Progress reports of runs over data: what the statistics engine, the sensitivity report and
lowrank's output-error trials tell their caller after each run (``shrink``'s
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


def named(progress: Progress | None, purpose: str) -> Progress | None:
    """``progress`` with each phase named after ``purpose`` ("the hint: statistics"), where
    there is one."""
    if progress is None or not purpose:
        return progress

    def report(phase: str, done: int, total: int | None = None) -> None:
        progress(f"{purpose}: {phase}", done, total)

    return report
