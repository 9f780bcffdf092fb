"""Model-output error of candidate edits, many measured in one streaming run.

A data-aware pass's ``Probe`` edits a copy of the model (``lowrank``: one layer replaced by
one rank's factors). As ``sensitivity`` does for quantized layers, the edited copies run
beside the unedited graph in one combined model that shares the graph inputs and the
unchanged initializers (only what an edit adds is a copy's own, under suffixed names), so
``batch`` probes cost about one model's weights plus ``batch`` copies of activations and one
pass over the data. For each probe:

    error = mean over outputs o of  Σ_samples ‖y'_o - y_o‖² / Σ_samples ‖y_o‖²

over the float outputs the graph computes: a relative squared error, additive over
independent small edits to first order (what a budget allocator sums), in which every output
counts alike whatever its scale (MiniLM: a sentence embedding beside token states of 8x its
norm).

An edit made from calibration statistics and measured on the same samples is judged on the
data it was fitted to: a whitened factorization that fits 128 sentences' activations well can
look 5-10x better there than on new sentences. A probe that can be ``remade`` is therefore
measured out of sample: the samples are cut into ``folds`` contiguous blocks (contiguous, so
that neighbouring, related samples stay on one side); for each block the probe's ``requests``
are collected on the other blocks (``runtime_check.collect``), the edit is remade from them
and measured on the block, and the error is the ratio of the sums over all blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import Edit, Probe, ProbeBudget
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import collect as collect_mod
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sample_batches
from onnx_shrink.runtime_check.progress import Progress

logger = logging.getLogger(__name__)

FOLDS = 2


@dataclasses.dataclass
class _Sums:
    """Σ‖y' - y‖² and Σ‖y‖² per compared output, over every sample measured so far."""

    diff: np.ndarray
    ref: np.ndarray

    def error(self) -> float:
        scale = np.where(self.ref > 0, self.ref, 1.0)
        return float(np.mean(self.diff / scale))


@dataclasses.dataclass(frozen=True)
class _Setting:
    """What every measuring run shares: the unedited model and how to run it."""

    base: ir.Model
    outputs: list[int]
    sep: str
    provider: str
    batch: int
    progress: Progress | None


def measure(
    model: ir.Model,
    probes: Sequence[Probe],
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    batch: int = 16,
    progress: Progress | None = None,
    folds: int = FOLDS,
    budget: ProbeBudget | None = None,
) -> dict[str, float]:
    """Relative squared output error of each probe's edit alone, by ``Probe.key``; probes
    with ``remade`` out of sample over ``folds`` blocks (in sample, with their ``edit``, when
    ``folds`` < 2 or the data holds fewer samples than that). ``model`` is not modified.

    Probes are measured in the order given (a pass keeps a layer's together: it factorizes
    once for them). Where ``budget`` cannot cover them all (projected from the first list's
    runs, each probe weighted by the nodes its copy runs), the rest of the list keeps the
    probes of the lowest ``Probe.priority`` values that fit (those of priority 0 at least);
    later lists measure the same probes, the others are left out of the result, and a
    warning names the option.

    Raises:
        ShrinkError: two probes share a key, or the model has no float output it computes.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    keys = [p.key for p in probes]
    if len(set(keys)) != len(keys):
        raise ShrinkError("probe: probe keys must be unique")
    base = model.clone()
    io.unshare_tensors(base)
    combined_mod.add_scored_outputs(base)
    outputs = combined_mod.compared_outputs(base, "probe")
    setting = _Setting(base, outputs, combined_mod.separator(base), provider, batch, progress)
    sums: dict[str, _Sums] = {}
    with contextlib.ExitStack() as stack:
        data = data_mod.replayable(dataset, stack)
        held_out = [p for p in probes if p.remade is not None]
        blocks = _blocks(data, data_mod.specs_from_model(model), folds) if held_out else []
        if held_out and not blocks:
            logger.info("probe: under %d samples; remade edits are measured in sample", folds)
            held_out = []
        held_keys = {p.key for p in held_out}
        weights = _weights(base, probes, batch)
        # Edits are made as their combined model is built: a block's remade edits all at once
        # would hold every layer's factors at every probed rank (GBs on a 0.6 GB encoder).
        in_sample = [
            _Edit(p.key, _made(p.edit), p.nodes, p.priority, weights[p.key])
            for p in probes
            if p.key not in held_keys
        ]
        held_weight = sum(weights[p.key] for p in held_out)
        clock = _Clock(budget, sum(e.weight for e in in_sample) + held_weight * len(blocks))
        _measure_edits(setting, in_sample, data, "output error trials", sums, clock)
        requests = list(dict.fromkeys(r for p in held_out for r in p.requests))
        for index, (fitted, tested) in enumerate(blocks, 1):
            stats = collect_mod.collect(
                model, requests, fitted, provider=provider, progress=progress
            )
            edits = [
                _Edit(
                    p.key, functools.partial(p.remade, stats), p.nodes, p.priority, weights[p.key]
                )
                for p in held_out
            ]
            _measure_edits(
                setting, edits, tested, f"output error trials, held-out block {index}", sums, clock
            )
            # Freed before the next block's are collected: two blocks' statistics at once
            # were the peak (Grams: 1.8 GB a set on a 0.6 GB encoder).
            del stats, edits
    logger.info("probe: %d edits measured in %d runs", clock.done, clock.runs)
    clock.warn(len(sums), len(keys))
    return {key: sums[key].error() for key in keys if key in sums}


@dataclasses.dataclass(frozen=True)
class _Edit:
    key: str
    make: Callable[[], Edit]
    nodes: tuple[str, ...]
    priority: int
    weight: float
    """What measuring it costs, in nodes run (``_weights``)."""


def _weights(base: ir.Model, probes: Sequence[Probe], batch: int) -> dict[str, float]:
    """Each probe's share of the runs that measure it, in nodes: its copy's (``nodes``
    downstream of what it edits, ``combined.copy_sizes``) and a ``batch``-th of the unedited
    graph that runs beside every ``batch`` copies. Projected by count instead, PP-OCRv4 rec's
    trials read 2.3x their time after the first run: its first layers' copies hold the whole
    model, its last ones' a few nodes."""
    sizes = combined_mod.copy_sizes(base, [p.nodes for p in probes])
    unedited = len(base.graph) / batch
    return {p.key: size + unedited for p, size in zip(probes, sizes, strict=True)}


class _Clock:
    """The probes' time against their budget. Each list of edits (in sample, or a held-out
    block's) gets the budget's share of its weight (``_Edit.weight``). The first time a list
    of probes is measured, the weight that share allows is projected after each run from
    the seconds per weight of the runs so far; past it, the rest of the list keeps the
    lowest priorities that fit (priority 0 at least). A list of the same probes measured
    again (the next held-out block) measures exactly the ones measured the first time, cut
    or not: every probe's error covers every block."""

    def __init__(self, budget: ProbeBudget | None, total: float) -> None:
        """``total``: the weight of every list to be measured."""
        self.budget, self.total = budget, total
        self.done = self.runs = 0
        self.decided: dict[tuple[str, ...], set[str]] = {}  # list's probes -> those measured
        self.cutting = False  # the list being measured may still be cut
        self.cut = False  # some list was
        self.projected = 0.0
        self.list_started = time.perf_counter()

    def start(self, edits: Sequence[_Edit]) -> list[_Edit]:
        """A list's edits to measure, as far as known before its first run."""
        self.list_started = time.perf_counter()
        kept = self.decided.get(_signature(edits))
        self.cutting = kept is None and self.budget is not None
        return list(edits) if kept is None else [edit for edit in edits if edit.key in kept]

    def rest(self, rest: list[_Edit], measured: Sequence[_Edit]) -> list[_Edit]:
        """The list's edits after those ``measured``, cut to what the budget allows."""
        if not self.cutting or not rest or self.budget is None:
            return rest
        done = sum(edit.weight for edit in measured)
        rate = (time.perf_counter() - self.list_started) / max(done, 1e-9)  # s per weight
        whole = done + sum(edit.weight for edit in rest)
        allowed = self.budget.seconds * whole / max(self.total, 1e-9) / max(rate, 1e-12)
        if allowed >= whole:
            return rest
        self.cutting, self.cut = False, True
        self.projected = max(self.projected, rate * self.total)
        threshold = 1  # priority 0 at least
        for tier in sorted({edit.priority for edit in rest}):
            if sum(edit.weight for edit in rest if edit.priority <= tier) <= allowed - done:
                threshold = max(threshold, tier + 1)
        return [edit for edit in rest if edit.priority < threshold]

    def ran(self, edits: int) -> None:
        self.done += edits
        self.runs += 1

    def finished(self, edits: Sequence[_Edit], measured: Sequence[_Edit]) -> None:
        self.decided.setdefault(_signature(edits), {edit.key for edit in measured})
        self.cutting = False

    def warn(self, measured: int, probes: int) -> None:
        if self.budget is None or measured >= probes:
            return
        logger.warning(
            "%s: measured %d of %d probes within its %g s (all would take about %.0f s); "
            "the others are left out, their curves read from the ones measured (raise %s "
            "to measure them)",
            self.budget.option.split(".")[0],
            measured,
            probes,
            self.budget.seconds,
            self.projected,
            self.budget.option,
        )


def _blocks(
    data: data_mod.Dataset, specs: Sequence[data_mod.InputSpec], folds: int
) -> list[tuple[data_mod.Dataset, data_mod.Dataset]]:
    """(all samples but block i, block i) for ``folds`` contiguous blocks of single samples;
    [] when there are fewer samples than folds (or folds < 2)."""
    count = sum(1 for _ in sample_batches.single_samples(data, specs))
    if folds < 2 or count < folds:
        return []
    edges = [round(i * count / folds) for i in range(folds + 1)]

    def subset(keep: Callable[[int], bool], what: str) -> data_mod.Dataset:
        def batches():
            for i, sample in enumerate(sample_batches.single_samples(data, specs)):
                if keep(i):
                    yield sample

        description = f"{data.description} ({what})"
        return data.restreamed(batches, description=description, samples=None, labels=None)

    result = []
    for low, high in zip(edges, edges[1:], strict=False):
        inside = f"samples {low}..{high - 1}"
        result.append(
            (
                subset(lambda i, lo=low, hi=high: not lo <= i < hi, f"all but {inside}"),
                subset(lambda i, lo=low, hi=high: lo <= i < hi, inside),
            )
        )
    return result


def _measure_edits(
    setting: _Setting,
    edits: Sequence[_Edit],
    data: data_mod.Dataset,
    phase: str,
    sums: dict[str, _Sums],
    clock: _Clock,
) -> None:
    """Add each edit's per-output sums over ``data`` to ``sums[key]``, ``batch`` edits per
    combined model, as many of them as ``clock`` keeps."""
    pending = clock.start(edits)
    done = 0
    while done < len(pending):
        group = pending[done : done + setting.batch]
        label = f"{phase} {done // setting.batch + 1}/{math.ceil(len(pending) / setting.batch)}"
        if setting.progress is not None:  # the status leaves the last run as this one is built
            setting.progress(label, 0, data.samples)
        applied = [_applied(edit.make()) for edit in group]
        combined = combined_mod.build(
            setting.base, applied, setting.outputs, setting.sep, "probe", [e.nodes for e in group]
        )
        diff, ref = _stream(combined, len(group), setting, data, label)
        for edit, row in zip(group, diff, strict=True):
            if edit.key in sums:
                sums[edit.key].diff += row
                sums[edit.key].ref += ref
            else:
                sums[edit.key] = _Sums(row, ref.copy())
        done += len(group)
        clock.ran(len(group))
        pending = pending[:done] + clock.rest(pending[done:], pending[:done])
    clock.finished(edits, pending)


def _signature(edits: Sequence[_Edit]) -> tuple[str, ...]:
    return tuple(edit.key for edit in edits)


def _made(edit: Edit) -> Callable[[], Edit]:
    return lambda: edit


def _applied(edit: Edit):
    def edited(copy: ir.Model) -> ir.Model:
        edit(copy)
        return copy

    return edited


def _stream(
    combined: ir.Model, count: int, setting: _Setting, data: data_mod.Dataset, phase: str
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``data``: (Σ‖y' - y‖² per copy and output, Σ‖y‖² per output), float64.

    Only elements the reference holds finite count (a model may output NaN by design: caustic
    -nmr's absent atoms); a copy non-finite where the reference is not has an infinite error.
    """
    graph_outputs = combined.graph.outputs[: len(setting.outputs)]
    references = [v.name or "" for v in graph_outputs]
    diff_sq = np.zeros((count, len(references)))
    ref_sq = np.zeros(len(references))
    stream = combined_mod.stream(combined, data, setting.provider, setting.progress, phase)
    for _, result in stream:
        for j, name in enumerate(references):
            ref = result[name].astype(np.float64)
            finite = np.isfinite(ref)
            whole = bool(finite.all())
            if not whole:
                ref = ref[finite]
            ref_sq[j] += float(np.sum(ref * ref))
            for i in range(count):
                copy = result[f"{name}{setting.sep}{i}"].astype(np.float64)
                diff = (copy if whole else copy[finite]) - ref
                error = float(np.sum(diff * diff))
                diff_sq[i, j] += error if not np.isnan(error) else np.inf
    return diff_sq, ref_sq
