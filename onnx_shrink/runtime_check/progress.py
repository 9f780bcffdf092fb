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

CHECK_LOAD, CHECK_OUTPUTS = "check: loading both models", "check: outputs"
CHECK_LAYERS = "check: where the error starts"
CHECK_LATENCY, CHECK_PROFILE = "check: latency", "check: where the time goes"
"""The check's phases: opening both models' sessions, its comparison's runs, the layer
localization (``--layers``), the timed pairs and the profile of a slower candidate."""

COUNTS = {CHECK_LOAD: "", CHECK_LATENCY: "pair", CHECK_LAYERS: "", CHECK_PROFILE: ""}
"""What a phase counts where it is not samples ("": nothing, a phase reported once as it
starts)."""


def counts(phase: str) -> str:
    """What ``phase``'s done and total count: "sample", "pair", or "" (nothing)."""
    return COUNTS.get(phase, "sample")


def named(progress: Progress | None, purpose: str) -> Progress | None:
    """``progress`` with each phase named after ``purpose`` ("the hint: statistics"), where
    there is one."""
    if progress is None or not purpose:
        return progress

    def report(phase: str, done: int, total: int | None = None) -> None:
        progress(f"{purpose}: {phase}", done, total)

    return report
