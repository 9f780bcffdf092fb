"""Sensitivity's measuring runs: each layer quantized alone, in combined models streamed over
the data, and the screening that keeps long reports short.

Screening: every layer is measured on the first ``SCREEN_SAMPLES`` samples, then the
``REFINED_LAYERS`` worst of them again on all the samples. The time a report takes is one
run of each layer's downstream per layer and sample (YOLOv8n's 207 layers on 32 samples:
64 of its 98 s in onnxruntime), and a few samples already rank the layers: the first 8 of 32
ranked YOLOv8n's 207 layers with a Spearman correlation of 0.984 to all 32 (PP-OCRv4 rec's
75: 0.982), the 10 worst the same in the same order. Screened, YOLOv8n's report took 40 s
and PP-OCRv4 rec's 23 s, against 98 and 38. The figures a user reads and acts on (the worst
layers, the hint) come from every sample; the layers past them keep their first samples'
figures, and the report says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import onnx_ir as ir

from onnx_shrink.compiler.statistics import Statistics
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import output_parts, run_costs, sample_batches
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check.compare import ErrorAccumulator
from onnx_shrink.runtime_check.numeric_report import OutputComparison
from onnx_shrink.runtime_check.sensitivity_hint import Target
from onnx_shrink.runtime_check.sensitivity_report import LayerSensitivity

logger = logging.getLogger(__name__)

SCREEN_SAMPLES = 8
"""The first samples every layer is measured on, where there are more than twice as many"""
REFINED_LAYERS = 16
"""The worst layers of the screening measured again on every sample: more than the console
and the HTML report print (10 and 15), and the hint's 3 with room for the ranks to move"""
LONG_SECONDS = 120.0
"""An estimated measurement past which the first run's pace is given as a warning"""


class Measurement(NamedTuple):
    """Every layer's error alone, worst first, and how it was measured."""

    layers: list[LayerSensitivity]
    runs: int
    screened: int
    """the samples the layers past the refined ones were measured on (0: none screened)"""


def measure_layers(
    runner: Runner, targets: Sequence[Target], batch_layers: int, samples: int
) -> Measurement:
    """Each of ``targets`` measured alone over ``runner``'s data (``samples`` in all),
    ``batch_layers`` a run, ranked worst first. Screened where ``samples`` is more than twice
    ``SCREEN_SAMPLES`` and the targets more than twice ``REFINED_LAYERS`` (with fewer, the
    second look costs about what the first saves): the refined layers (measured on every
    sample) then rank first, by their own figures, and the others after them, by their
    screening's."""
    groups = _groups(targets, batch_layers)
    every = f"{len(targets)} layers"
    if samples <= 2 * SCREEN_SAMPLES or len(targets) <= 2 * REFINED_LAYERS:
        measured = runner.measure_all(groups, every)
        return Measurement(sorted(measured, key=severity, reverse=True), len(groups), 0)
    # The refined layers' runs still to come count in the screening's time left, each as
    # samples / SCREEN_SAMPLES screening runs (it reads every sample, not the first few).
    after = math.ceil(REFINED_LAYERS / batch_layers) * samples / SCREEN_SAMPLES
    screened = sorted(
        runner.measure_all(groups, every, SCREEN_SAMPLES, after), key=severity, reverse=True
    )
    chosen = {layer.position for layer in screened[:REFINED_LAYERS]}
    refine = _groups([t for t in targets if t.position in chosen], batch_layers)
    refined = sorted(
        runner.measure_all(refine, f"{len(chosen)} worst again"), key=severity, reverse=True
    )
    layers = refined + screened[REFINED_LAYERS:]
    return Measurement(layers, len(groups) + len(refine), SCREEN_SAMPLES)


def _groups(targets: Sequence[Target], size: int) -> list[Sequence[Target]]:
    return [targets[i : i + size] for i in range(0, len(targets), size)]


def severity(layer: LayerSensitivity) -> tuple[bool, float]:
    """How bad a layer is: NaN/Inf first, then by relative error (NaN as infinite)."""
    error = layer.relative_error
    return layer.nonfinite > 0, error if not math.isnan(error) else math.inf


def in_runs(data: data_mod.Dataset, base: ir.Model) -> data_mod.Dataset:
    """``data`` one sample a run. A combined run holds the activations of the float graph and
    of each copy (9 graphs at 8 layers a run) for every sample it joins: an EfficientNet
    U-Net over runs of 32 images at 256x256 peaked at 7.4 GB, and on PP-OCRv4 rec runs of 4
    lines took the accuracy target's ranking from 283 to 716 MiB. Where a layer quantizes its
    activations at run time (an LSTM: DynamicQuantizeLSTM takes one scale per run), it is
    also what the check measures: a joined run's scale would make each sample's error depend
    on its batch-mates."""
    specs = data_mod.specs_from_model(base)
    if not sample_batches.splittable(data, specs):  # each feed is one sample
        return data
    return sample_batches.one_sample_a_run(data, specs)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Runner:
    """Builds and runs the combined model of each batch of layers over the data."""

    def __init__(
        self,
        base: ir.Model,
        quant: QuantPass,
        stats: Statistics,
        data: data_mod.Dataset,
        provider: str,
        progress: progress_mod.Progress | None,
    ) -> None:
        self.base, self.quant, self.stats, self.data = base, quant, stats, data
        self.provider, self.progress = provider, progress
        self.outputs = combined_mod.compared_outputs(base, "sensitivity")
        self.sep = combined_mod.separator(base)
        self.samples = 0
        """the samples of the last run"""

    def measure_all(
        self,
        groups: Sequence[Sequence[Target]],
        what: str,
        first: int | None = None,
        after: float = 0.0,
    ) -> list[LayerSensitivity]:
        """Each group's layers measured in one run (over the ``first`` samples only, where
        given). Progress is reported per run as ``what``, the run and the time left: at the
        pace of the runs done, weighted by what each run computes (``run_costs``), with
        ``after`` runs of average cost still to come once these are done. Logged too, and a
        warning where it is long (a progress bar is not shown off a terminal)."""
        measured: list[LayerSensitivity] = []
        started = time.perf_counter()
        layers = sum(map(len, groups))
        nodes = list(self.base.graph)
        costs = run_costs.run_costs(
            self.base.graph, [[nodes[t.position] for t in group] for group in groups]
        )
        costs.append(after * sum(costs) / max(1, len(costs)))
        data = self.data
        if first is not None:
            specs = data_mod.specs_from_model(self.base)
            data = sample_batches.first_samples(data, specs, first)
        left = None
        for index, group in enumerate(groups, 1):
            phase = f"{what}, run {index}/{len(groups)}"
            if left is not None:
                phase += f", about {_duration(left)} left"
            measured += self.measure(group, data, phase)
            spent = time.perf_counter() - started
            left = run_costs.seconds_left(spent, costs, index)
            logger.info(
                "sensitivity: %s: run %d of %d, %d of %d layers measured in %.0f s, about "
                "%.0f s left",
                what,
                index,
                len(groups),
                len(measured),
                layers,
                spent,
                left,
            )
            if index == 1 and left > LONG_SECONDS:
                logger.warning(
                    "sensitivity: %d layers, %d a run over %d samples: about %s at the first "
                    "run's pace; fewer calibration samples, or quant.exclude for layers known "
                    "to stay float, make it shorter",
                    layers,
                    len(group),
                    self.samples,
                    _duration(spent + left),
                )
        return measured

    def measure(
        self, group: Sequence[Target], data: data_mod.Dataset, phase: str
    ) -> list[LayerSensitivity]:
        """One streaming run of the combined model of ``group``: each layer's error alone."""
        passes = [
            dataclasses.replace(self.quant, only=(target.key,), bias_correction=False)
            for target in group
        ]
        compared = self.compare(passes, data, phase)
        return [
            _layer(target, rows, self.samples) for target, rows in zip(group, compared, strict=True)
        ]

    def compare(
        self, passes: Sequence[QuantPass], data: data_mod.Dataset, phase: str
    ) -> list[list[OutputComparison]]:
        """One streaming run over ``data`` of the float graph (outputs ``<out>``) beside a
        copy quantized by each of ``passes`` (outputs ``<out><sep>i``), sharing inputs and
        float initializers: per copy, each output against the float one."""
        if self.progress is not None:  # the status leaves the last run as this one is built
            self.progress(phase, 0, data.samples)  # (YOLOv8n's 16 worst again: 4 s)
        combined = self.combined(passes)
        references = [v.name or "" for v in combined.graph.outputs[: len(self.outputs)]]
        accumulators = [[ErrorAccumulator(name) for name in references] for _ in passes]
        # Parts only along the axes the float outputs' first batch shows one: one pass over
        # each reference, where every copy's output along every axis would cost many.
        parts: list[output_parts.OutputParts] = []
        self.samples = 0
        runs = combined_mod.stream(combined, data, self.provider, self.progress, phase)
        for batch, result in runs:
            if not parts:
                axes = {name: output_parts.axes_for(result[name]) for name in references}
                parts = [output_parts.OutputParts(axes) for _ in passes]
            for index, row in enumerate(accumulators):
                for acc in row:
                    candidate = result[f"{acc.name}{self.sep}{index}"]
                    acc.add(result[acc.name], candidate)
                    parts[index].add_output(acc.name, result[acc.name], candidate)
            self.samples += batch.samples
        if not parts:  # no batch
            parts = [output_parts.OutputParts({}) for _ in passes]
        return [
            [found.annotate(acc.result()) for acc in row]
            for row, found in zip(accumulators, parts, strict=True)
        ]

    def combined(self, passes: Sequence[QuantPass]) -> ir.Model:
        """The float graph plus a copy quantized by each of ``passes`` (see ``compare``)."""
        edits = [self._quantized_by(quant) for quant in passes]
        return combined_mod.build(self.base, edits, self.outputs, self.sep, "sensitivity")

    def _quantized_by(self, quant: QuantPass):
        def edit(copy: ir.Model) -> ir.Model:
            result = quant.bind(self.stats)(copy)
            if not result.modified:  # each pass quantizes one layer (``only``)
                raise ShrinkError(f"sensitivity: node '{quant.only[0]}' could not be quantized")
            return result.model

        return edit


def _layer(target: Target, results: Sequence[OutputComparison], samples: int) -> LayerSensitivity:
    worst = max(results, key=lambda r: (r.nan_count + r.inf_count > 0, r.scored_error))
    output, error, cosine, snr, max_abs = (
        worst.name,
        worst.relative_error,
        worst.cosine,
        worst.snr_db,
        worst.max_abs_error,
    )
    if worst.scored_error > error:  # its small part's: a detector's class scores
        output = f"{worst.name} ({worst.small_part})"
        error, snr = worst.scored_error, worst.small_part_snr_db
        cosine, max_abs = worst.small_part_cosine, worst.small_part_max_abs_error
    return LayerSensitivity(
        node=target.name,
        op_type=target.op_type,
        position=target.position,
        output=output,
        relative_error=error,
        cosine=cosine,
        snr_db=snr,
        max_abs_error=max_abs,
        nonfinite=worst.nan_count + worst.inf_count,
        samples=samples,
    )
