"""An accuracy target for ``quant``: keep the worst layers float until ``max_error`` holds.

The sensitivity report ranks the quantized layers by the output error each causes alone and
says which ``quant.exclude`` keeps the worst float (with their *companions*, the quantized
nodes that would otherwise keep their inputs quantized). ``meet_target`` goes the rest of the
way: it measures the whole pass with the k worst float, for growing k, and settles on the
fewest that bring the worst float output's relative error (over the calibration data,
against the float model) to ``max_error`` or below.

Layers' errors interact (on PP-OCRv4 rec, two roundings of equal weight error gave output
errors of 0.18 and 0.24), so the k is searched on measurements of the whole pass, never
predicted from the single-layer figures: k = 1, 2, 4, ... until one meets the target, then
bisection between the last that missed and it. Every measurement calibrates the pass as a
run with those exclusions would (its own statistics: which tensors are measured changes the
histograms' edges), so the error reported for the chosen k is the error of the model the
pipeline then writes, bias correction aside (it needs a look at the quantized model; the
figures are without it, and it usually lowers the error further).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import time

import onnx_ir as ir

from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from onnx_shrink.runtime_check.collect import Progress
from onnx_shrink.runtime_check.sensitivity_report import SensitivityReport
from onnx_shrink.wording import counted, human_bytes

logger = logging.getLogger(__name__)

MAX_MEASUREMENTS = 16
"""Whole-pass measurements the search may take: k doubling, then bisection, needs about
2·log2(layers) of them (12 for PP-OCRv4 rec's 100 layers)."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One measurement: the whole pass with the ``layers`` worst kept float."""

    layers: int
    kept_float: int
    """nodes ``exclude`` then keeps float: those layers (the named ones) and companions"""
    error: float
    bytes: int


@dataclasses.dataclass(frozen=True)
class TargetOutcome:
    """What ``meet_target`` found for one quant pass."""

    max_error: float
    met: bool
    layers: int
    """the worst layers kept float"""
    exclude: tuple[str, ...]
    """the pass's ``exclude`` after the search: its own patterns, then the added ones"""
    added: tuple[str, ...]
    error: float
    """the chosen configuration's worst float output relative error"""
    bytes: int
    whole_error: float
    """with every layer the pass would quantize quantized"""
    whole_bytes: int
    attempts: tuple[Attempt, ...]
    samples: int
    data: str
    seconds: float
    without_bias_correction: bool

    def summary(self) -> str:
        """One line for the console and the HTML report."""
        head = f"quant.max_error={self.max_error:g} "
        if not self.added and self.met:
            head += "met with every layer quantized"
        elif self.met:
            head += f"met with the {counted(self.layers, 'worst layer')} float"
        else:
            head += f"NOT met; the least error found keeps {counted(self.layers, 'layer')} float"
        kept = f" ({counted(len(self.added), 'node')} excluded)" if self.added else ""
        line = (
            f"{head}{kept}: worst output relative error {self.error:.3g} "
            f"({human_bytes(self.bytes)})"
        )
        if self.added:
            line += f", {self.whole_error:.3g} with every layer ({human_bytes(self.whole_bytes)})"
        line += (
            f"; {counted(self.samples, 'calibration sample')}, "
            f"{counted(len(self.attempts), 'measurement')}, {self.seconds:.1f}s"
        )
        if self.without_bias_correction:
            line += " (measured without bias correction)"
        return line

    def exclude_option(self) -> str | None:
        """The ``--set`` that keeps the same layers float without the search, or None
        where none were added."""
        if not self.added:
            return None
        return "--set " + shlex.quote("quant.exclude=" + ",".join(self.exclude))

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        result["exclude_option"] = self.exclude_option()
        return result


def meet_target(
    model: ir.Model,
    quant: QuantPass,
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    progress: Progress | None = None,
    hint: bool = False,
) -> tuple[QuantPass, TargetOutcome, SensitivityReport]:
    """The pass to run on ``model`` (the float model as ``quant`` gets it, not modified) so
    that its worst float output's relative error over ``dataset`` is at most
    ``quant.max_error``: ``quant`` with the worst layers added to ``exclude`` (and
    ``max_error`` off), what the search found, and the sensitivity report it ranked by
    (with its hint measured where ``hint``).

    Where no number of worst layers kept float meets the target, the one of least error
    measured is taken, with a warning.
    """
    started = time.perf_counter()
    target = quant.max_error
    plain = dataclasses.replace(quant, max_error=math.inf)
    report = sensitivity_mod.sensitivity(
        model,
        plain,
        dataset,
        provider=provider,
        progress=progress,
        planned_layers=len(model.graph),
        hint=hint,
    )
    whole = dataclasses.replace(plain, bias_correction=False)
    search = _Search(model, whole, report, dataset, provider, progress)
    effect = report.hint_effect
    if effect is not None and effect.whole_bytes is not None:  # measured already
        whole_run = Attempt(0, 0, effect.whole, effect.whole_bytes)
        search.attempts[report.exclude_patterns(0)] = whole_run
    chosen = search.run(target)
    best = search.attempts[report.exclude_patterns(chosen)]
    first = search.attempts[report.exclude_patterns(0)]
    met = best.error <= target
    exclude = report.exclude_patterns(chosen)
    outcome = TargetOutcome(
        max_error=target,
        met=met,
        layers=chosen,
        exclude=exclude,
        added=exclude[len(quant.exclude) :],
        error=best.error,
        bytes=best.bytes,
        whole_error=first.error,
        whole_bytes=first.bytes,
        attempts=tuple(sorted(search.attempts.values(), key=lambda a: a.layers)),
        samples=report.samples,
        data=report.data,
        seconds=time.perf_counter() - started,
        without_bias_correction=quant.bias_correction,
    )
    if not met:
        logger.warning(
            "quant.max_error=%g cannot be met: the least worst-output error measured is %.3g, "
            "with %s float (raise max_error, or give more representative calibration data)",
            target,
            best.error,
            counted(chosen, "layer"),
        )
    return dataclasses.replace(plain, exclude=exclude), outcome, report


class _Search:
    """The measurements of the whole pass with the k worst layers float, by the ``exclude``
    patterns they make (different k can make the same: unnamed or inert layers)."""

    def __init__(self, model, whole, report, dataset, provider, progress) -> None:
        self.model, self.whole, self.report = model, whole, report
        self.dataset, self.provider, self.progress = dataset, provider, progress
        self.attempts: dict[tuple[str, ...], Attempt] = {}
        # Past this k the patterns stop growing (never every layer: see exclude_patterns).
        self.most = len(report.layers)
        while self.most > 0 and self._patterns(self.most - 1) == self._patterns(self.most):
            self.most -= 1

    def _patterns(self, k: int) -> tuple[str, ...]:
        return self.report.exclude_patterns(k)

    def error(self, k: int) -> float:
        patterns = self._patterns(k)
        if patterns not in self.attempts:
            config = dataclasses.replace(self.whole, exclude=patterns)
            error, size = sensitivity_mod.worst_error(
                self.model, config, self.dataset, provider=self.provider, progress=self.progress
            )
            added = len(patterns) - len(self.whole.exclude)
            self.attempts[patterns] = Attempt(k, added, error, size)
        return self.attempts[patterns].error

    def run(self, target: float) -> int:
        """The fewest worst layers float that meet ``target`` (by doubling, then bisection),
        or the k of least error measured where none does."""
        if self.error(0) <= target:
            return 0
        missed, met, k = 0, None, 1
        while met is None and missed < self.most and len(self.attempts) < MAX_MEASUREMENTS:
            k = min(k, self.most)
            if self.error(k) <= target:
                met = k
            else:
                missed, k = k, 2 * k
        if met is None:
            return min(self.attempts.values(), key=lambda a: (a.error, a.layers)).layers
        while met - missed > 1 and len(self.attempts) < MAX_MEASUREMENTS:
            middle = (missed + met) // 2
            if self.error(middle) <= target:
                met = middle
            else:
                missed = middle
        return met
