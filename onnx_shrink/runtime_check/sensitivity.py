"""Quantization sensitivity: the output error each quantized layer causes on its own.

For every node the ``quant`` pass quantizes (its plan's, and the embedding tables and LSTMs it
quantizes without statistics), a copy of the float graph in which only that node is quantized
(``QuantPass(only=(node,))``) runs beside the float graph in one combined model.
The copies share the graph inputs and the float initializers (only what the pass adds, the
quantized weights and the scales, is their own, under suffixed names), so a batch of k layers
costs about one model's weights plus k copies of activations, and one streaming pass over the
data measures all k (onnxruntime's common-subexpression elimination even computes the float
prefix before each layer once). Layers rank by the relative error of their worst float output.
Many layers on many samples are screened first (``sensitivity_runs``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import onnx_ir as ir

from onnx_shrink import warning_records
from onnx_shrink.compiler import graph_edit, io, pipeline, tensor_patterns
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.compiler.options import pattern_names
from onnx_shrink.compiler.statistics import Statistics
from onnx_shrink.passes.quant import hard_activations, placement
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import checker
from onnx_shrink.runtime_check import collect as collect_mod
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check import sensitivity_hint as hint_mod
from onnx_shrink.runtime_check import sensitivity_runs as runs_mod
from onnx_shrink.runtime_check.sensitivity_hint import Target
from onnx_shrink.runtime_check.sensitivity_report import (
    HINT_LAYERS,
    HintEffect,
    SensitivityReport,
)

logger = logging.getLogger(__name__)

Progress = progress_mod.Progress


def sensitivity(
    model: ir.Model,
    quant: QuantPass,
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    batch_layers: int = 8,
    progress: Progress | None = None,
    planned_layers: int = HINT_LAYERS,
    hint: bool = True,
    naming: graph_edit.Naming | None = None,
) -> SensitivityReport:
    """Measure, for each node ``quant`` would quantize in ``model`` (the float model as it is
    before the pass, not modified), the output error of quantizing that node alone.

    Statistics are collected once; then one combined model and one pass over ``dataset`` per
    ``batch_layers`` layers (many layers on many samples: over the first samples, then the
    worst again over all; ``sensitivity_runs.measure_layers``). The pass's and the
    statistics' warnings are not repeated here (``QUIET``): the pass's own run gives them.
    The ``planned_layers`` worst layers get their companions (``plan_hint``: what
    ``exclude_patterns`` can keep float); with ``hint``, the hint for the ``HINT_LAYERS``
    worst is measured too (``hint_effect``), its sizes without the node names ``naming``
    gave for the run (as the result is written).

    Raises:
        ShrinkError: the model has no float output computed by its graph, or a layer cannot
            be quantized alone.
    """
    if batch_layers < 1:
        raise ValueError(f"batch_layers must be at least 1, got {batch_layers}")
    started = time.perf_counter()
    quant = dataclasses.replace(quant, max_error=math.inf)  # each layer alone, as given
    base = model.clone()
    io.unshare_tensors(base)
    names = {}
    for original, copy in zip(model.graph, base.graph, strict=True):
        names[copy] = original.name or ""
        # The clone names a node whose name is None (node_Conv_0); an opset conversion then
        # replaces the nodes, and that name would pass for the caller's below.
        copy.name = original.name
    combined_mod.add_scored_outputs(base)  # after: its Identity nodes are none of the caller's
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet(*QUIET))
        data = data_mod.replayable(dataset, stack)
        # requests converts the opset and infers types, as the pass does before planning.
        stats = collect_mod.collect(
            base, quant.requests(base), data, provider=provider, progress=progress
        )
        # With the ranges the pass derives instead of measuring: the plan below is the
        # pass's own, and each copy quantizing one layer alone gets them as they are.
        stats = quant.completed_statistics(base, stats)
        # Each node's name in the caller's model, before unnamed ones get one here. ``base``
        # went through quant.requests: its opset converted (nodes replaced: ``names`` then
        # misses, and a node's own name is the caller's) and its types inferred. A step of
        # rule 12's hard-activation rewrite goes by its activation's name: the one the user
        # keeps it float by (its own is the pass's, in no model of the caller's).
        caller = {node: names[node] if node in names else _step_origin(node) for node in base.graph}
        targets, unmeasured, plan = _quantized_layers(base, quant, stats, caller)
        runs = runs_mod.in_runs(data, base)
        runner = runs_mod.Runner(base, quant, stats, runs, provider, progress)
        measured = runs_mod.measure_layers(runner, targets, batch_layers, stats.samples)
        report = SensitivityReport(
            layers=hint_mod.plan_hint(
                measured.layers, targets, base, quant, stats, caller, plan, planned_layers
            ),
            samples=runner.samples,
            data=dataset.description,
            synthetic=dataset.synthetic,
            runs=measured.runs,
            screened=measured.screened,
            seconds=0.0,
            unmeasured=tuple(unmeasured),
            excluded=quant.exclude,
        )
        effect = None
        if hint:
            effect = _hint_effect(base, quant, stats, data, provider, report, progress, naming)
    return dataclasses.replace(
        report,
        runs=report.runs + HINT_RUNS * (effect is not None),
        seconds=time.perf_counter() - started,
        hint_effect=effect,
    )


def _step_origin(node: ir.Node) -> str:
    return hard_activations.origin(node) or node.name or ""


QUIET = (
    "onnx_shrink.passes",
    "onnx_shrink.compiler.options",
    "onnx_shrink.runtime_check.collect",
    "onnx_shrink.runtime_check.collect_runs",
    "onnx_shrink.runtime_check.collect_graph",
)
"""Loggers kept to errors while measuring: the pass's own run says what they would."""
HINT_RUNS = 3  # measuring the hint: its calibration, then each pass against the float model


def _hint_effect(
    base: ir.Model,
    quant: QuantPass,
    stats: Statistics,
    data: data_mod.Dataset,
    provider: str,
    report: SensitivityReport,
    progress: Progress | None,
    naming: graph_edit.Naming | None,
) -> HintEffect | None:
    """The whole pass and the pass with the hint applied, each run against the float model
    over ``data``, each on its own statistics as a run with those options would measure them
    (the hint's: one more calibration). Not copies in the combined model: the whole pass
    rewrites shared constants (narrow storage, embedding tables)."""
    k = min(HINT_LAYERS, len(report.layers))
    patterns = report.exclude_patterns(k)
    if len(patterns) == len(report.excluded):  # none of the worst has a name
        return None
    whole = dataclasses.replace(quant, bias_correction=False)
    worst, sizes = [], []
    hint_progress = progress_mod.named(progress, "the hint")
    for layers, config in ((0, whole), (k, dataclasses.replace(whole, exclude=patterns))):
        named = measuring(hint_progress, layers)
        error, size = _worst_error(base, config, whole, stats, data, provider, named, naming)
        worst.append(error)
        sizes.append(size)
    kept = len(patterns) - len(report.excluded)
    return HintEffect(kept, worst[0], worst[1], quant.bias_correction, *sizes)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Only errors from the loggers ``names`` inside: the measuring runs said again what the
    user's run of the pass says, and the hint's things of its own ("quant: no node could be
    quantized") as if of the run."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for one, level in zip(loggers, levels, strict=True):
            one.setLevel(level)


def _worst_error(base, config, whole, stats, data, provider, progress, naming) -> tuple[float, int]:
    """``worst_error`` of ``config`` (error, bytes); ``stats`` serve the ``whole`` pass,
    measured on ``base`` as ``whole.requests`` left it."""
    if config is not whole:
        measured = worst_error(
            base, config, data, provider=provider, progress=progress, naming=naming
        )
    else:
        copy = base.clone()
        io.unshare_tensors(copy)
        result = config.bind(stats)(copy)
        measured = _measured(base, result, data, provider, progress=progress, naming=naming)
    return measured.error, measured.bytes


class Measured(NamedTuple):
    """A quantized model measured against the float one (``worst_error``)."""

    error: float
    """the worst float output's relative error over all the samples"""
    bytes: int
    """the quantized model's, saved (without the node names given for the run)"""
    samples: int
    quantized: bool
    """whether the pass quantized anything"""


def measuring(progress: Progress | None, worst: int) -> Progress | None:
    """``progress`` with the phases of a measurement of the pass with the ``worst`` layers
    float named after it ("4 worst float: outputs")."""
    return progress_mod.named(progress, f"{worst} worst float" if worst else "all quantized")


def worst_error(
    model: ir.Model,
    config: QuantPass,
    data: data_mod.Dataset,
    *,
    provider: str = "cpu",
    progress: Progress | None = None,
    reference: checker.Reference | None = None,
    naming: graph_edit.Naming | None = None,
) -> Measured:
    """``model`` quantized by ``config``, measured against ``model`` itself (not modified):
    the worst float output's relative error (``OutputComparison.scored_error``, over all
    samples of ``data``; NaN/Inf where the float model is finite: ∞). ``config`` calibrates
    on ``data`` as a run of it would (its own statistics); a follow-up it asks for (bias
    correction) is not made. ``reference``: ``model`` opened for many measurements (its
    runs kept). ``naming``: the names given to unnamed nodes for the run, left out of the
    size as the written result leaves them out."""
    copy = model.clone()
    io.unshare_tensors(copy)
    measured = collect_mod.collect(
        copy, config.requests(copy), data, provider=provider, progress=progress
    )
    stats = config.completed_statistics(copy, measured)
    result = config.bind(stats)(copy)
    return _measured(model, result, data, provider, reference, progress, naming)


def _measured(
    base: ir.Model,
    result: ir.passes.PassResult,
    data: data_mod.Dataset,
    provider: str,
    reference: checker.Reference | None = None,
    progress: Progress | None = None,
    naming: graph_edit.Naming | None = None,
) -> Measured:
    """``result``'s model against ``base`` (or ``reference``, ``base`` opened) over the
    float outputs the layers are ranked by; its size without ``naming``'s names."""
    against = reference if reference is not None else base
    numeric = checker.compare(against, result.model, data, provider=provider, progress=progress)
    names = {base.graph.outputs[i].name for i in combined_mod.compared_outputs(base, "quant")}
    # A detector's class scores beside its boxes: the part counts as an output of its own.
    error = max(o.scored_error for o in numeric.outputs if o.name in names)
    size = large_tensors.saved_bytes(result.model, naming=naming)
    return Measured(error, size, numeric.samples, result.modified)


def _unmatched_name(index: int, taken: set[str], patterns: Sequence[str]) -> str:
    """A name for unnamed node ``index`` that no node has and no ``exclude`` pattern matches
    (the pass matches its "" against them), or "" where every try is matched."""
    for form in ("unnamed_{}", "_{}_", "~{}", "#{}", "{}"):
        name = form.format(index)
        while name in taken:
            name += "_"
        if not any(pattern_names(p, name) for p in patterns):
            taken.add(name)
            return name
    return ""


def _quantized_layers(
    base: ir.Model, quant: QuantPass, stats: Statistics, caller: dict[ir.Node, str]
) -> tuple[list[Target], list[str], placement.Plan]:
    """The nodes the full pass quantizes (its own plan, on the same statistics, and the
    embedding tables and LSTMs it quantizes without statistics), in graph order, split into
    those measurable alone (a unique name in ``base``) and the names of the others (as
    ``caller``, each node's name in the caller's model, gives them), and the plan. Unnamed
    ones are named here, in ``base``, after the plan (``only`` singles a layer out by name),
    with names no ``exclude`` pattern matches: the plan stays the pass's own."""
    plan = placement.plan(base.graph, stats, quant._exclusions)  # exactly what the pass uses
    position = {node: i for i, node in enumerate(base.graph)}
    counts = collections.Counter(node.name for node in base.graph)
    taken = set(counts)
    targets, unmeasured = [], []
    layers = sorted({*plan.nodes, *quant.dynamic_layers(base)}, key=position.__getitem__)
    for node in layers:
        name = caller[node]
        if not node.name:
            node.name = _unmatched_name(position[node], taken, quant.exclude)
        if node.name and (counts[node.name] == 1 or node.name not in counts):
            targets.append(Target(node.name, name, node.op_type, position[node]))
        else:
            unmeasured.append(name or f"<unnamed {node.op_type} #{position[node]}>")
    if unmeasured:
        logger.warning(
            "sensitivity: %d quantized nodes share their name with another node (or, unnamed, "
            "every name tried for them matches an exclude pattern) and are not measured (a "
            "layer is measured and excluded by its name): %s",
            len(unmeasured),
            ", ".join(unmeasured[:5]),
        )
    return targets, unmeasured, plan


def first_quant(passes: Sequence[ir.passes.PassBase]) -> int | None:
    """The index of the first quant pass (the one the report measures), or None."""
    return next((i for i, p in enumerate(passes) if isinstance(p, QuantPass)), None)


def before_quant(
    source: io.ModelSource,
    pass_list: Sequence[ir.passes.PassBase],
    steps: Sequence[pipeline.StepRecord],
    collector: pipeline.Collector,
    dataset: data_mod.Dataset,
    provider: str,
    progress: Progress | None,
) -> SensitivityReport:
    """``shrink``'s report: the sensitivity of the first quant pass of ``pass_list``, on the
    model as it was before it: the passes before it (deterministic; those rolled back, as
    ``steps`` say, left out) re-run on a fresh load of ``source``. Its ``seconds`` count that
    reload and re-run too: the report costs them, the compile not."""
    started = time.perf_counter()
    index = first_quant(pass_list)
    assert index is not None
    quant = pass_list[index]
    assert isinstance(quant, QuantPass)
    kept = [not step.rolled_back for step in steps[:index]]
    before = [p for p, keep in zip(pass_list[:index], kept, strict=True) if keep]
    fresh = io.load(source)
    graph_edit.unlist_weight_inputs(fresh)  # as the compile did (and warned)
    naming = graph_edit.name_unnamed_nodes(fresh)  # the same names: the hint's are the compile's
    with warning_records.said_already():  # the compile ran these passes, and said it all
        float_model = pipeline.run(fresh, before, collect=collector).model
    quant = tensor_patterns.resolved(quant, float_model)  # as the compile's pipeline did
    report = sensitivity(
        float_model, quant, dataset, provider=provider, progress=progress, naming=naming
    )
    return dataclasses.replace(report, seconds=time.perf_counter() - started)
