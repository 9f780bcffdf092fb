"""An accuracy target for ``quant``: keep the worst layers float until ``max_error`` holds.

The sensitivity report ranks the quantized layers by the output error each causes alone and
says which ``quant.exclude`` keeps the worst float (with their *companions*, the quantized
nodes that would otherwise keep their inputs quantized). ``meet_target`` goes the rest of the
way: it measures the whole pass with the k worst float, for growing k, and settles on the
fewest that bring the worst float output's relative error (over the calibration data,
against the float model) to ``max_error`` or below.

Layers' errors interact (PP-OCRv4 rec on 128 samples: 0.170 with every layer quantized,
0.136 with the 4 worst float, 0.173 with the 8 worst), so k is searched on measurements of
the whole pass, never predicted from the single-layer figures: k = 1, 2, 4, ... until one
meets the target, then bisection between the last that missed and it. Unlike the hint, the
search may keep every layer float (the pass then quantizes nothing, with a warning).

Every measurement calibrates the pass as a run with those exclusions would (its own
statistics: which tensors are measured changes the histograms' edges), so the error reported
for the chosen k is the error of the model the pipeline then writes, on the calibration
data: bias correction aside (it needs a look at the quantized model; the figures are without
it, and it usually lowers the error further), and unless ``--verify-each`` rolls the pass
back (``TargetOutcome.rolled_back``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import checker, sample_batches
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from onnx_shrink.runtime_check.progress import Progress
from onnx_shrink.runtime_check.sensitivity_report import (
    HINT_LAYERS,
    SensitivityReport,
    exclude_option,
)
from onnx_shrink.wording import counted, human_bytes

logger = logging.getLogger(__name__)

RANKING_SAMPLES = 32
"""The first samples the layers are ranked on (each layer's own error), unless the
sensitivity report is wanted too: ranking costs a run of the model per layer and sample
(PP-OCRv4 rec on 32 samples: 46 s, against about 2.5 s for a measurement of the whole
pass), less where many layers are screened (``sensitivity_runs``: YOLOv8n's target of 0.015
on 32 samples took 49 s instead of 102)."""

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
    quantized: bool = True
    """whether the pass quantized anything with those layers float"""

    @classmethod
    def of(cls, layers: int, added: int, measured: sensitivity_mod.Measured) -> Attempt:
        return cls(layers, added, measured.error, measured.bytes, measured.quantized)


@dataclasses.dataclass(frozen=True)
class TargetOutcome:
    """What ``meet_target`` found for one quant pass."""

    max_error: float
    met: bool
    layers: int
    """the k of the worst layers whose named nodes (and companions) were kept float"""
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
    every_layer: bool = False
    """met only with every layer float: the pass quantizes nothing"""
    budget_spent: bool = False
    """``MAX_MEASUREMENTS`` stopped the search: fewer layers float may meet the target"""
    pass_index: int | None = None
    """the quant pass's place in the pipeline, where ``shrink`` ran the search"""
    spec: str = ""
    """the pass as given, with its target (the step records the pass that ran)"""
    rolled_back: bool = False
    """``--verify-each`` rolled the pass back: the model written has none of it"""

    def summary(self) -> str:
        """One line for the console and the HTML report."""
        head = f"quant.max_error={self.max_error:g} "
        float_nodes = f"{counted(len(self.added), 'node')} float"
        if self.every_layer:
            head += f"met only with every layer float ({float_nodes}): nothing is quantized"
        elif not self.added and self.met:
            head += "met with every layer quantized"
        elif self.met:
            head += f"met with the {counted(self.layers, 'worst layer')} float"
            if len(self.added) != self.layers:  # a layer's companions (its Relu) add nodes
                head += f" ({counted(len(self.added), 'node')})"
        else:
            head += f"NOT met; the least error measured keeps {float_nodes}"
        error = beside_target(self.error, self.max_error)
        line = f"{head}: worst output relative error {error} ({human_bytes(self.bytes)})"
        if self.added:
            line += (
                f", {beside_target(self.whole_error, self.max_error)} with every layer quantized "
                f"({human_bytes(self.whole_bytes)})"
            )
        line += (
            f"; {counted(self.samples, 'calibration sample')}, "
            f"{counted(len(self.attempts), 'measurement')}, {self.seconds:.1f}s"
        )
        if self.without_bias_correction:
            line += " (measured without bias correction)"
        if self.budget_spent:
            line += f"; the search stopped at {MAX_MEASUREMENTS} measurements"
        if self.rolled_back:
            line += "; --verify-each then rolled the pass back: the model written has none of it"
        return line

    def exclude_option(self) -> str | None:
        """The ``--set`` that keeps the same layers float without the search (in place of
        ``quant.max_error``, and of any ``quant.exclude`` given: it holds those too), or None
        where none were added."""
        if not self.added or self.rolled_back:
            return None
        return exclude_option(self.exclude)

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        result["exclude_option"] = self.exclude_option()
        return result


def beside_target(error: float, target: float) -> str:
    """``error`` to 3 significant digits, or as many more as it takes not to read as
    ``target`` when it is not: rxnmap's 0.05004 with every layer quantized printed as "0.05"
    beside quant.max_error=0.05, and the node kept float for it (the file 20.4 -> 32.4 MiB)
    looked needless."""
    for digits in range(3, 10):
        text = f"{error:.{digits}g}"
        if error == target or float(text) != target:
            return text
    return repr(error)


def meet_target(
    model: ir.Model,
    quant: QuantPass,
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    progress: Progress | None = None,
    hint: bool = False,
    naming: graph_edit.Naming | None = None,
) -> tuple[QuantPass, TargetOutcome | None, SensitivityReport | None]:
    """The pass to run on ``model`` (the float model as ``quant`` gets it, not modified) so
    that its worst float output's relative error over ``dataset``, against ``model``, is at
    most ``quant.max_error``: ``quant`` with the worst layers added to ``exclude`` (and
    ``max_error`` off), what the search found (None where the pass quantizes no layer), and
    the sensitivity report it ranked by (with its hint measured where ``hint``; None where
    the whole pass meets the target, which then needs no ranking). Sizes are measured
    without the node names ``naming`` gave for the run, as the result is written.

    The whole pass is measured first. Where it misses, the layers are ranked on the first
    ``RANKING_SAMPLES`` samples (on all of them where ``hint``), and each candidate is
    measured on all of them. At most ``MAX_MEASUREMENTS`` measurements are made; where none
    meets the target, the one of least error is taken, with a warning. Every layer may be
    kept float, with a warning: the pass then quantizes nothing.

    Raises:
        ShrinkError: the model has no float output computed by its graph.
    """
    started = time.perf_counter()
    model = _scored_view(model)
    combined_mod.compared_outputs(model, f"{quant.name}.max_error")
    with contextlib.ExitStack() as stack:
        # Every measurement compares with the float model on the same data: it runs once.
        reference = checker.Reference.open(model, stack)
        measure = _Measure(dataset, provider, progress, reference, naming)
        return _meet(model, quant, measure, hint, started)


@dataclasses.dataclass(frozen=True)
class _Measure:
    """How the search measures a configuration of the pass: over ``dataset`` on
    ``provider``, against ``reference`` (the float model, opened), its size without the
    node names ``naming`` gave for the run."""

    dataset: data_mod.Dataset
    provider: str
    progress: Progress | None
    reference: checker.Reference
    naming: graph_edit.Naming | None

    def worst_error(self, model: ir.Model, config: QuantPass, k: int) -> sensitivity_mod.Measured:
        """``config`` (the pass with its ``k`` worst layers float) on ``model``, measured."""
        return sensitivity_mod.worst_error(
            model,
            config,
            self.dataset,
            provider=self.provider,
            progress=sensitivity_mod.measuring(self.progress, k),
            reference=self.reference,
            naming=self.naming,
        )


def _meet(
    model: ir.Model, quant: QuantPass, measure: _Measure, hint: bool, started: float
) -> tuple[QuantPass, TargetOutcome | None, SensitivityReport | None]:
    """``meet_target`` with the float model opened (``measure.reference``)."""
    plain = dataclasses.replace(quant, max_error=math.inf)
    whole = dataclasses.replace(plain, bias_correction=False)
    dataset = measure.dataset
    first = None
    if not hint:  # the report measures the whole pass itself
        with sensitivity_mod.quiet(*sensitivity_mod.QUIET):
            first = measure.worst_error(model, whole, 0)
        if not first.quantized:
            return plain, None, None  # the pass says itself that it quantizes nothing
        if first.error <= quant.max_error:  # YOLOv8n: a 130 s ranking was spent on this
            attempts = {quant.exclude: Attempt.of(0, 0, first)}
            outcome = _outcome(quant, attempts, quant.exclude, first.samples, dataset, started)
            return plain, outcome, None
    report = _ranked(model, plain, measure, hint)
    if not report.layers:
        return plain, None, report
    search = _Search(model, whole, report, measure)
    if first is not None:
        search.attempts[search.patterns(0)] = Attempt.of(0, 0, first)
        search.samples = first.samples
    search.reuse(report)
    with sensitivity_mod.quiet(*sensitivity_mod.QUIET):  # the pass's own run says it once
        chosen = search.run(quant.max_error)
    exclude = search.patterns(chosen)  # measured: run() settles on measured k only
    outcome = _outcome(
        quant, search.attempts, exclude, search.samples, dataset, started, chosen, search.spent
    )
    _warn(outcome)
    return dataclasses.replace(plain, exclude=exclude), outcome, report


def _scored_view(model: ir.Model) -> ir.Model:
    """``model``, or where its outputs are integers (a tagger's ArgMax) or ordered by a
    selection (a detector's TopK) a copy that also outputs the float values they are decided
    from: the target is an error of those."""
    if not combined_mod.scores_elsewhere(model):
        return model
    view = model.clone()
    return view if combined_mod.add_scored_outputs(view) else model


def _ranked(model: ir.Model, plain: QuantPass, measure: _Measure, hint: bool) -> SensitivityReport:
    """The sensitivity report the search ranks by, every layer's companions planned. The
    ranking only orders the candidates: a few samples do, unless the report is wanted as
    such (``hint``), while every measurement of the whole pass reads all of them."""
    ranked_on = measure.dataset
    if not hint:
        specs = data_mod.specs_from_model(model)
        ranked_on = sample_batches.first_samples(measure.dataset, specs, RANKING_SAMPLES)
    return sensitivity_mod.sensitivity(
        model,
        plain,
        ranked_on,
        provider=measure.provider,
        progress=measure.progress,
        planned_layers=len(model.graph),
        hint=hint,
        naming=measure.naming,
    )


def _outcome(
    quant: QuantPass,
    attempts: dict[tuple[str, ...], Attempt],
    exclude: tuple[str, ...],
    samples: int,
    dataset: data_mod.Dataset,
    started: float,
    layers: int = 0,
    spent: bool = False,
) -> TargetOutcome:
    """The outcome of settling on ``exclude`` (the ``layers`` worst float) after
    ``attempts`` (by their patterns; the whole pass's is ``quant.exclude``)."""
    best, first = attempts[exclude], attempts[quant.exclude]
    met = best.error <= quant.max_error
    return TargetOutcome(
        max_error=quant.max_error,
        met=met,
        layers=layers,
        exclude=exclude,
        added=exclude[len(quant.exclude) :],
        error=best.error,
        bytes=best.bytes,
        whole_error=first.error,
        whole_bytes=first.bytes,
        attempts=tuple(sorted(attempts.values(), key=lambda a: a.layers)),
        samples=samples,
        data=dataset.description,
        seconds=time.perf_counter() - started,
        without_bias_correction=quant.bias_correction,
        every_layer=met and not best.quantized,
        budget_spent=spent,
    )


def _warn(outcome: TargetOutcome) -> None:
    if not outcome.met:
        logger.warning(
            "quant.max_error=%g is not met: the least worst-output error measured is %s, "
            "with %s float%s (raise max_error, or keep whole op types float with "
            "quant.exclude_op_types)",
            outcome.max_error,
            beside_target(outcome.error, outcome.max_error),
            counted(len(outcome.added), "node"),
            "; the search stopped at its measurement budget" if outcome.budget_spent else "",
        )
    elif outcome.every_layer:
        logger.warning(
            "quant.max_error=%g is met only with every layer float: the quant pass quantizes "
            "nothing",
            outcome.max_error,
        )


class _Search:
    """The measurements of the whole pass with the k worst layers float, by the ``exclude``
    patterns they make (different k can make the same: unnamed or inert layers)."""

    def __init__(self, model, whole, report, measure: _Measure) -> None:
        self.model, self.whole, self.report, self.measure = model, whole, report, measure
        self.attempts: dict[tuple[str, ...], Attempt] = {}
        self.samples = report.samples
        self.spent = False
        # Past ``most`` the patterns stop growing; patterns only grow with k (bisection).
        last = len(self.patterns(len(report.layers)))
        low, high = 0, len(report.layers)
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if len(self.patterns(middle)) < last else (low, middle)
        self.most = low

    def patterns(self, k: int) -> tuple[str, ...]:
        return self.report.exclude_patterns(k, every=True)

    def reuse(self, report: SensitivityReport) -> None:
        """Take the hint's measurements (the whole pass, and its worst layers float), made
        on the same samples, each on its own calibration as ``error`` makes them."""
        effect = report.hint_effect
        if effect is None or effect.whole_bytes is None or effect.hinted_bytes is None:
            return
        k = min(HINT_LAYERS, len(report.layers))
        hinted = report.exclude_patterns(k)
        self.attempts[self.patterns(0)] = Attempt(0, 0, effect.whole, effect.whole_bytes)
        if hinted == self.patterns(k):  # else the hint's cap on float layers cut it short
            added = len(hinted) - len(self.whole.exclude)
            self.attempts[hinted] = Attempt(k, added, effect.hinted, effect.hinted_bytes)

    def error(self, k: int) -> float:
        patterns = self.patterns(k)
        if patterns not in self.attempts:
            config = dataclasses.replace(self.whole, exclude=patterns)
            measured = self.measure.worst_error(self.model, config, k)
            self.samples = measured.samples
            added = len(patterns) - len(self.whole.exclude)
            self.attempts[patterns] = Attempt.of(k, added, measured)
        return self.attempts[patterns].error

    def _can_measure(self, k: int) -> bool:
        """Whether ``k`` is measured already, or the budget allows measuring it (the hint's
        reused measurements count in it)."""
        left = self.patterns(k) in self.attempts or len(self.attempts) < MAX_MEASUREMENTS
        self.spent = self.spent or not left
        return left

    def run(self, target: float) -> int:
        """The fewest worst layers float that meet ``target`` (by doubling, then bisection),
        or the k of least error measured where none does."""
        if self.error(0) <= target:
            return 0
        missed, met, k = 0, None, 1
        while met is None and missed < self.most and self._can_measure(min(k, self.most)):
            k = min(k, self.most)
            if self.error(k) <= target:
                met = k
            else:
                missed, k = k, 2 * k
        if met is None:
            return min(self.attempts.values(), key=lambda a: (a.error, a.layers)).layers
        while met - missed > 1 and self._can_measure((missed + met) // 2):
            middle = (missed + met) // 2
            if self.error(middle) <= target:
                met = middle
            else:
                missed = middle
        return met
