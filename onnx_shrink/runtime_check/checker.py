"""Checking a candidate model against its reference: the library calls behind ``check``.

``compare`` gives numerics (and accuracy with labels), ``localize_layers`` the per-layer error,
``check`` both plus alternate-run latency and sizes; the compile command's final check and
``--verify-each`` call the same functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_shrink.compiler import io, stats, walk
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import BadModelError, CandidateFailedError, RunFailedError
from onnx_shrink.runtime_check import (
    batch_mixing,
    bench,
    check_notes,
    declared_outputs,
    op_time,
    output_parts,
    sample_batches,
    selection,
    sessions,
)
from onnx_shrink.runtime_check import branches as branches_mod
from onnx_shrink.runtime_check import compare as compare_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import labels as labels_mod
from onnx_shrink.runtime_check import layers as layers_mod
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check import residuals as residuals_mod
from onnx_shrink.runtime_check.numeric_report import NumericReport, Tolerances
from onnx_shrink.runtime_check.progress import Progress
from onnx_shrink.runtime_check.reference_runs import CachedRuns, KeptRuns

if TYPE_CHECKING:  # accuracy_target measures with this module
    from onnx_shrink.runtime_check.accuracy_target import TargetOutcome

logger = logging.getLogger(__name__)

AnyModel = str | os.PathLike | bytes | onnx.ModelProto | ir.Model
DataSource = (
    str | os.PathLike | Mapping[str, np.ndarray] | data_mod.FeedReader | data_mod.Dataset | None
)


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """Everything ``onnx-shrink check`` measures."""

    reference: str
    candidate: str
    provider: str
    numeric: NumericReport
    layers: layers_mod.LayerReport | None
    latency: bench.LatencyComparison | None
    reference_size: bench.ModelSize
    candidate_size: bench.ModelSize
    reference_bytes_by_op: dict[str, int]
    candidate_bytes_by_op: dict[str, int]
    seconds: float = 0.0
    """the check's wall time: loading, numerics, layers, latency, sizes"""
    time_by_op: op_time.OpTimeComparison | None = None
    """where each model's time goes, profiled where the latency says the candidate is slower"""
    passes: tuple[str, ...] | None = None
    """the names of the passes that made the candidate, where a shrink checked its result;
    None for ``onnx-shrink check``, which cannot know them"""
    pipeline: tuple[str, ...] = ()
    """every pass the shrink ran, changed the model or not"""
    targets: tuple[TargetOutcome, ...] = ()
    """what the shrink's ``quant.max_error`` searches found on the calibration data (the
    shrink's result reports them: left out of ``to_dict``)"""

    @property
    def passed(self) -> bool:
        return self.numeric.passed

    def notes(self) -> list[str]:
        """What the numbers alone do not say (``check_notes``), with the fixes of the passes
        that made the candidate."""
        return check_notes.notes(
            self.numeric, self.passes, pipeline=self.pipeline, targets=self.targets
        )

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        del result["targets"]
        result["passed"] = self.passed
        result["verdict"] = self.numeric.verdict
        result["notes"] = self.notes()
        return result


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A model as both an IR model (for specs and layers) and a session source."""

    model: ir.Model
    source: sessions.ModelBytesOrPath
    label: str


def _load(model: AnyModel, label: str) -> _Loaded:
    if isinstance(model, (str, os.PathLike)):
        return _Loaded(io.load(model), Path(model), str(model))
    if isinstance(model, bytes):
        loaded = io.load(io.parse_bytes(model), f"the {label}")
        return _Loaded(loaded, model, label)
    loaded = io.load(model, f"the {label}")
    return _Loaded(loaded, io.to_bytes(loaded), label)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference loaded once, its runs' outputs kept (``KeptRuns``), for ``compare``
    with many candidates on the same data: each feed runs once. ``open`` it in an ExitStack
    that outlives the comparisons: closing it deletes the kept outputs."""

    loaded: _Loaded
    kept: KeptRuns

    @classmethod
    def open(cls, model: AnyModel, stack: contextlib.ExitStack) -> Reference:
        prefix = "onnx-shrink-reference-"
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        return cls(_load(model, "reference"), KeptRuns(folder))


@dataclasses.dataclass(frozen=True)
class _Pair:
    """Both models loaded and validated, a session for each, and the checked data."""

    ref: _Loaded
    cand: _Loaded
    ref_session: ort.InferenceSession | CachedRuns
    cand_session: ort.InferenceSession
    specs: list[data_mod.InputSpec]
    dataset: data_mod.Dataset
    branches: branches_mod.BranchWatch | None = None
    """If branches the candidate rewrote: their conditions are read from the reference's runs"""


def _open(
    reference: AnyModel | Reference,
    candidate: AnyModel,
    data: DataSource,
    labels,
    input_shapes,
    provider,
) -> _Pair:
    kept = reference if isinstance(reference, Reference) else None
    ref = kept.loaded if kept is not None else _load(reference, "reference")
    cand = _load(candidate, "candidate")
    specs = data_mod.specs_from_model(ref.model)
    dataset = data_mod.prepare(specs, data, input_shapes, labels=labels)
    watch = branches_mod.BranchWatch.of(ref.model, cand.model)
    ref_source = ref.source
    if watch is not None and watch.read:
        # The conditions as extra outputs; the weights shared, not copied.
        ref_source = large_tensors.session_source(layers_mod.with_outputs(ref.model, watch.read))
    # The two sessions take turns (runs, then latency pairs): neither's threads may spin on.
    ref_session = sessions.create_session(ref_source, provider=provider, stop_spinning=True)
    if data is None:  # the defaults of synthetic dims grown where the reference fails on them
        dataset = sessions.synthetic_that_runs(
            ref_session,
            dataset,
            specs,
            input_shapes,
            failed=f"{ref.label} failed on a synthetic check sample",  # as the check's runs say
            label=ref.label,
            purpose="for the check",
        )
    if not dataset.independent_samples:  # (shrink's preflight tried the input already)
        # Before the cache: its trial runs are no feeds the check will run again.
        dataset = batch_mixing.vetted(dataset, specs, ref_session, ref.label, ref.model)
    if kept is not None and ref_source is ref.source:  # not with a BranchWatch's outputs
        ref_session = CachedRuns(ref_session, kept.kept)
    cand_session = _candidate_session(ref, cand, specs, provider)
    # Joined samples only where the candidate does not mix them either.
    dataset = batch_mixing.vetted(dataset, specs, cand_session, cand.label, cand.model)
    return _Pair(ref, cand, ref_session, cand_session, specs, dataset, watch)


def _candidate_session(
    ref: _Loaded, cand: _Loaded, specs: Sequence[data_mod.InputSpec], provider: str
) -> ort.InferenceSession:
    """The candidate's session, once it is known to load where the reference does and to
    take the reference's inputs and give its outputs, by name. A candidate computing in
    float16 or bfloat16 is opened in a child process first: a crash there is an error here,
    not the end of this process."""
    if sessions.computes_in_half(cand.model):
        crash = sessions.crash_on_open(cand.source, provider)
        if crash is not None:
            raise CandidateFailedError(
                f"{cand.label}: onnxruntime {ort.__version__} crashes ({crash}) creating its "
                f"session on {provider}, where the reference's opens: it mishandles the "
                "candidate's float16/bfloat16 graph (fp16.exclude keeps nodes float32)"
            )
    try:
        session = sessions.create_session(cand.source, provider=provider, stop_spinning=True)
    except BadModelError as e:  # onnxruntime loads the reference: the candidate is broken
        why = (
            f"onnxruntime's {provider} provider has no kernel for one of its nodes: check it "
            "with --ep on the provider it is for, or skip the check with --no-check"
            if sessions.missing_kernel(e)
            else "the reference loads: the candidate is broken"
        )
        raise CandidateFailedError(f"{e} ({why})") from e
    fed = {i.name for i in session.get_inputs()}
    needed = [spec.name for spec in specs if spec.name not in fed]  # what the data feeds
    if needed and fed - {spec.name for spec in specs}:  # inputs renamed, not dropped
        raise CandidateFailedError(
            f"{cand.label} has no input {needed[0]!r} of {ref.label}'s (its inputs: "
            f"{', '.join(sorted(fed))}): both are fed the same inputs, by name"
        )
    if needed:  # a frozen input (fold.freeze): the candidate computes without it
        logger.info(
            "%s takes no input %s: fed to %s only", cand.label, ", ".join(needed), ref.label
        )
    theirs = [o.name for o in session.get_outputs()]
    missing = [v.name for v in ref.model.graph.outputs if v.name not in theirs]
    if missing:
        raise CandidateFailedError(
            f"{cand.label} has no output {missing[0]!r} of {ref.label}'s (its outputs: "
            f"{', '.join(theirs)}): outputs are compared by name"
        )
    return session


def compare(
    reference: AnyModel | Reference,
    candidate: AnyModel,
    data: DataSource = None,
    *,
    labels: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerances: Tolerances = Tolerances(),
    provider: str = "cpu",
    progress: Progress | None = None,
) -> NumericReport:
    """Run both models on the same inputs and compare every output (see ``NumericReport``).
    A ``Reference`` runs each feed once over many calls. ``progress`` hears of the samples
    compared (``progress.OUTPUTS``)."""
    pair = _open(reference, candidate, data, labels, input_shapes, provider)
    return _numeric(pair, tolerances, progress)[0]


def _numeric(
    pair: _Pair, tolerances: Tolerances, progress: Progress | None = None
) -> tuple[NumericReport, data_mod.Batch]:
    """The numeric comparison, and the first batch it ran (one sample where the data's
    batch could not run joined): the latency is timed on it. ``progress`` hears of the
    samples compared after each batch."""
    dataset = pair.dataset
    first: list[data_mod.Batch] = []
    names = [v.name for v in pair.ref.model.graph.outputs]  # not the If conditions read
    samples = 0
    sample = "a synthetic check sample" if dataset.synthetic else "a check sample"
    # The reference failing means the inputs do not fit it; the candidate failing where the
    # reference ran means the candidate is broken, whatever the inputs.
    broken = f"The candidate is broken: {pair.ref.label} runs on the same inputs"
    watch = pair.branches
    conditions = watch.read if watch is not None else []

    def run(session, label: str, batch: data_mod.Batch, outputs, hint: str, error):
        feed = sessions.fitted_feed(session, batch.feed)
        failed = f"{label} failed on {sample}"
        # Released after each run: the latency below times these sessions again, and a
        # session kept at its largest run's memory beside the other doubled the check's peak.
        return sessions.run(
            session, feed, outputs, failed=failed, hint=hint, error=error, release_memory=True
        )

    unfit = data_mod.unfit_hint(dataset)
    if progress is not None:
        progress(progress_mod.OUTPUTS, 0, dataset.samples)
    residuals = residuals_mod.Residuals()
    parts = output_parts.OutputParts()

    def run_reference(batch: data_mod.Batch) -> dict[str, np.ndarray]:
        outputs = names + conditions
        return run(pair.ref_session, pair.ref.label, batch, outputs, unfit, RunFailedError)

    def output_batches() -> Iterator[compare_mod.OutputBatch]:
        nonlocal samples
        # Only the reference's failure splits a batch: the candidate failing where the
        # reference ran is the candidate's fault.
        runs = sample_batches.alone_after_failure(
            _batches(pair), pair.specs, run_reference, "check"
        )
        for batch, ref_out in runs:
            samples += batch.samples
            cand_out = run(
                pair.cand_session, pair.cand.label, batch, names, broken, CandidateFailedError
            )
            if not first:
                first.append(batch)
                declared_outputs.check_first_run(pair.ref, pair.cand, cand_out)
            if watch is not None:
                watch.add({**batch.feed, **ref_out})
                ref_out = {name: ref_out[name] for name in names}
            residuals.add(batch.feed, ref_out, cand_out)
            parts.add(ref_out, cand_out)
            if progress is not None:
                progress(progress_mod.OUTPUTS, samples, dataset.samples)
            yield ref_out, cand_out, batch.labels

    report = compare_mod.compare_batches(
        output_batches(),
        tolerances=tolerances,
        data=dataset.description,
        synthetic=dataset.synthetic,
        class_outputs=labels_mod.class_score_outputs(pair.ref.model.graph),
        binary_outputs=labels_mod.binary_score_outputs(pair.ref.model.graph),
    )
    untested = watch.untested() if watch is not None else ()
    ordered = selection.ordered_outputs(pair.ref.model.graph)
    report = dataclasses.replace(
        parts.annotated(residuals.annotated(report)),
        samples=samples,
        untested_branches=untested,
        ordered_by=tuple(
            (value.name or "", selection.describe(node)) for value, node in ordered.items()
        ),
    )
    if not first:  # no batch at all: what the data's first feed check says
        first.append(data_mod.Batch(dataset.first_feed(), 1, None))
    return report, first[0]


LATENCY_SECONDS = 30.0
"""The check's default budget for timed latency runs: a batch of 16 fingerprints at 256x256
(LEADER) runs 2.5 s, so 30 pairs and the warm-up took 165 s; within the budget, 45 s."""


RUN_TIME_SCALES = frozenset(
    {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"}
)
"""Ops that quantize an activation with a scale taken from the whole run's tensor"""


def _batches(pair: _Pair) -> Iterator[data_mod.Batch]:
    """The check's batches: as the data holds them, or each sample alone where the
    candidate quantizes activations at run time (``RUN_TIME_SCALES``). One scale for a
    whole joined run makes each sample's error depend on its batch-mates (a ViT's cosine
    read 0.99949 in runs of 16 samples, 0.99985 alone): alone, it is the sample's own, as
    calibration's statistics are."""
    dataset = pair.dataset
    dynamic = {n.op_type for n in walk.all_nodes(pair.cand.model)} & RUN_TIME_SCALES
    if not dynamic or not sample_batches.splittable(dataset, pair.specs):
        return dataset.batches()
    logger.info(
        "check: each sample runs alone: the candidate quantizes activations at run time (%s)",
        ", ".join(sorted(dynamic)),
    )
    return sample_batches.one_sample_a_run(dataset, pair.specs).batches()


def check(
    reference: AnyModel,
    candidate: AnyModel,
    data: DataSource = None,
    *,
    labels: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerances: Tolerances = Tolerances(),
    provider: str = "cpu",
    layers: bool = False,
    latency_runs: int = 30,
    latency_seconds: float | None = LATENCY_SECONDS,
    progress: Progress | None = None,
) -> CheckReport:
    """Numerics, optional per-layer localization, alternate-run latency and sizes.

    The latency times ``latency_runs`` pairs, fewer (at least ``bench.MIN_TIMED_PAIRS``)
    where they take more than ``latency_seconds`` (None: no limit). ``progress`` hears of
    each phase (``progress.CHECK_OUTPUTS``: samples compared; ``CHECK_LATENCY``: pairs
    timed, of those the time budget allows; the others once, as they start)."""
    started = time.perf_counter()
    report = progress_mod.named(progress, progress_mod.CHECK) or progress_mod.ignored
    with contextlib.ExitStack() as stack:
        report(progress_mod.LOAD, 0)
        pair = _open(reference, candidate, data, labels, input_shapes, provider)
        if layers:  # read twice: a one-shot reader is spilled as the numerics read it
            pair = dataclasses.replace(pair, dataset=data_mod.replayable(pair.dataset, stack))
        numeric, timed = _numeric(pair, tolerances, report)
        layer_report = None
        if layers:
            report(progress_mod.LAYERS, 0)
            layer_report = layers_mod.localize(
                pair.ref.model, pair.cand.model, pair.dataset, pair.specs, provider=provider
            )
    ref, cand = pair.ref, pair.cand
    latency, time_by_op = None, None
    if latency_runs > 0:
        latency = bench.compare_latency(
            pair.ref_session,
            pair.cand_session,
            timed.feed,
            runs=latency_runs,
            batch=timed.samples,
            max_seconds=latency_seconds,
            progress=lambda done, total: report(progress_mod.LATENCY, done, total),
        )
        if latency.slower:
            del pair  # its sessions: the profile opens its own, with the profiler on
            report(progress_mod.PROFILE, 0)
            time_by_op = _profile(ref, cand, timed.feed, provider, latency)
    return CheckReport(
        reference=ref.label,
        candidate=cand.label,
        provider=provider,
        numeric=numeric,
        layers=layer_report,
        latency=latency,
        reference_size=bench.model_size(ref.source),
        candidate_size=bench.model_size(cand.source),
        reference_bytes_by_op=stats.bytes_by_op_type(ref.model),
        candidate_bytes_by_op=stats.bytes_by_op_type(cand.model),
        seconds=time.perf_counter() - started,
        time_by_op=time_by_op,
    )


PROFILE_RUNS = 10
PROFILE_SECONDS = 10.0
"""The time a slower candidate's profile aims at, both models' runs together: fewer than
``PROFILE_RUNS`` runs (at least 1) where their latency asks it."""


def _profile(
    ref: _Loaded,
    cand: _Loaded,
    feed: Mapping[str, np.ndarray],
    provider: str,
    latency: bench.LatencyComparison,
) -> op_time.OpTimeComparison | None:
    """Both models' kernel time by op type (``op_time``), or None where onnxruntime's
    profiler fails: the check's figures stand without it."""
    pair_seconds = (latency.reference.p50_ms + latency.candidate.p50_ms) / 1e3
    runs = max(1, min(PROFILE_RUNS, int(PROFILE_SECONDS / max(pair_seconds, 1e-6))))
    try:
        return op_time.compare(ref.source, cand.source, feed, provider=provider, runs=runs)
    except Exception as e:  # onnxruntime raises several unrelated exception types
        logger.warning("check: the profile of where the time goes failed: %s", e)
        return None
