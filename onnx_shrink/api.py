"""``shrink()``: load, run a pass pipeline, save, and verify against the original.

The same function serves the command line and export pipelines. The caller's model (a path,
an ``onnx.ModelProto`` or an ``onnx_ir.Model``) is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from onnx_shrink import calibration_hooks, each_pass, errors, preflight, quant_targets
from onnx_shrink.calibration_hooks import CalibrationProgress
from onnx_shrink.compiler import graph_edit, io, pass_order, pipeline, spec
from onnx_shrink.compiler.data_aware import DataAwarePass
from onnx_shrink.errors import DataError, RunFailedError, ShrinkError
from onnx_shrink.frozen_heap import frozen_heap
from onnx_shrink.passes import fold_freeze
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import checker as check_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import probe as probe_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from onnx_shrink.runtime_check import sessions, shapes
from onnx_shrink.runtime_check.accuracy_target import TargetOutcome
from onnx_shrink.runtime_check.numeric_report import DEFAULT_TOLERANCES, Tolerances
from onnx_shrink.runtime_check.progress import Progress
from onnx_shrink.warning_records import recorded

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
    """What a run produced and what it measured."""

    model: ir.Model
    steps: tuple[pipeline.StepRecord, ...]
    input_bytes: int
    output_bytes: int
    output_path: Path | None
    seconds: float
    """the whole run: the compile, the check and the sensitivity report"""
    compile_seconds: float
    """the compile alone: load, passes with their calibration (and the search of any
    ``quant.max_error``), accounting and save"""
    verification: check_mod.CheckReport | None
    sensitivity: sensitivity_mod.SensitivityReport | None = None
    """per quantized layer, the output error it causes alone (``shrink(sensitivity=True)``)"""
    accuracy_targets: tuple[TargetOutcome, ...] = ()
    """per quant pass with ``max_error``, the layers kept float to meet it and the errors
    measured (in pipeline order)"""
    unchecked: str = ""
    """why the check asked for could not run on the result (the error ``shrink`` raised,
    which carries this result); empty otherwise"""
    warnings: tuple[str, ...] = ()
    """what the run warned of (``"warning: <message>"``, and ``"error: ..."`` for errors
    logged, in order), as it logged it"""

    def target_of(self, step: pipeline.StepRecord) -> TargetOutcome | None:
        """The ``quant.max_error`` search made before ``step``'s pass, if any (the step
        records the pass that ran; the outcome, the pass as given)."""
        return next((t for t in self.accuracy_targets if t.pass_index == step.index), None)

    def to_dict(self) -> dict[str, object]:
        """Everything except the model, as JSON-ready data (the ``--report`` file)."""
        first, last = self.steps[0], self.steps[-1]
        return {
            "output_path": str(self.output_path) if self.output_path else None,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "passes": [step.to_dict() for step in self.steps],
            "total": {
                "nodes": [first.before.nodes, last.after.nodes],
                "params": [first.before.params, last.after.params],
                "tensor_bytes": [first.before.tensor_bytes, last.after.tensor_bytes],
                "macs": [first.before.macs, last.after.macs],
                # > 0: that side's MACs are a lower bound
                "nodes_without_macs": [
                    first.before.nodes_without_macs,
                    last.after.nodes_without_macs,
                ],
                "bytes_on_disk": [self.input_bytes, self.output_bytes],
            },
            "verification": self.verification.to_dict() if self.verification else None,
            "unchecked": self.unchecked or None,
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None,
            "accuracy_targets": [outcome.to_dict() for outcome in self.accuracy_targets],
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    """How a run is checked against the original on onnxruntime."""

    data: check_mod.DataSource = None
    """.npz, folder of .npy, test_data_set_* folders, a reader object; None: synthetic"""
    labels: str | os.PathLike | None = None
    input_shapes: Mapping[str, Sequence[int] | str] | None = None
    """NAME -> dims (or text: ``"1x3x224x224"``) of synthetic inputs, as ``shrink`` takes them"""
    tolerances: Tolerances = Tolerances()
    provider: str = "cpu"
    layers: bool = False
    latency_runs: int = 30
    """latency pairs timed at most (``latency_seconds`` may stop them sooner)"""
    latency_seconds: float | None = check_mod.LATENCY_SECONDS
    """seconds of timed latency runs after which the timing stops, once 5 pairs are timed
    (None: all ``latency_runs``)"""
    verify_each: bool = False
    """compare after every pass and roll back a pass that breaks the tolerances"""
    strict: bool = False
    """with verify_each: stop at the first pass that breaks the tolerances instead"""

    def __post_init__(self) -> None:
        if self.strict and not self.verify_each:
            raise ShrinkError("CheckOptions: strict=True works with verify_each=True only")
        # The command line's checks of --runs and --input-shape, for callers of the library.
        preflight.at_least(0, latency_runs=self.latency_runs)  # 0: no latency
        seconds = self.latency_seconds
        if seconds is not None and not seconds >= 0:  # NaN too
            raise ShrinkError(f"CheckOptions: latency_seconds={seconds} must be 0 or more, or None")
        object.__setattr__(self, "input_shapes", preflight.parse_shapes(self.input_shapes))

    def each_pass_tolerances(self) -> Tolerances:
        """The tolerances for --verify-each; without any given, ``DEFAULT_TOLERANCES``
        (cosine 0.999, 1% accuracy, 99% of integer outputs' elements equal)."""
        if self.tolerances.any:
            return self.tolerances
        return DEFAULT_TOLERANCES


@frozen_heap
@recorded
def shrink(
    model: io.ModelSource,
    passes: str | Sequence[spec.PassLike] | None = "fold",
    *,
    output: str | os.PathLike | None = None,
    sets: str | Iterable[str] = (),
    recipe: str | os.PathLike | None = None,
    dump_dir: str | os.PathLike | None = None,
    external_data: bool | None = None,
    check: bool | CheckOptions = True,
    data: check_mod.DataSource = None,
    calibration: check_mod.DataSource = None,
    input_shapes: Mapping[str, Sequence[int] | str] | None = None,
    on_pass_start: pipeline.StepCallback | None = None,
    on_calibration: CalibrationProgress | None = None,
    sensitivity: bool = False,
) -> ShrinkResult:
    """Compress ``model`` with ``passes`` and, unless ``check=False``, check the result.

    Args:
        model: a path to an .onnx file, its bytes, an ``onnx.ModelProto`` or an
            ``onnx_ir.Model``.
        passes: ``"fold,quant"``, or a list of pass names and pass instances; None takes the
            list from ``recipe``.
        output: where to save the result; None keeps it in memory only.
        sets: ``"pass.option=value"`` overrides, as on the command line.
        check: False to skip the check, True for defaults, or ``CheckOptions``.
        data: shorthand for ``CheckOptions(data=...)``: inputs (and labels) for the check:
            a path, a dict of arrays (as an .npz holds them) or a reader with ``get_next()``.
        calibration: inputs for data-aware passes (quant, ...); default: ``data`` (or the
            check's); without any, synthetic inputs with a loud warning.
        input_shapes: NAME -> dims (or text: ``"1x3x224x224"``) of the synthetic inputs
            made where no data is given, for calibration and for the check (where
            ``CheckOptions.input_shapes`` wins).
        on_pass_start: called with (index, pass) as each pass starts.
        on_calibration: called as calibration runs, with (phase, samples done, samples in
            all or None where the data does not say: a reader object's); also as the
            sensitivity report and the measured searches run, each run its own phase
            ("sensitivity: 207 layers, run 3/26, about 41 s left") counting the samples it
            reads, and as the check runs (``progress.CHECK_OUTPUTS``: samples compared;
            ``CHECK_LATENCY``: pairs timed, of those the time budget allows; the others
            once, with 0 and None, as they start).
        sensitivity: with a quant pass in the pipeline, also measure each quantized layer's
            output error alone on the calibration data (``ShrinkResult.sensitivity``).

    Raises (all ``ShrinkError``s; a check that breaks its tolerances is no error: see
    ``ShrinkResult.verification.passed``):
        PipelineSpecError: the pass spec is wrong (raised before the model is loaded).
        BadModelError: the model cannot be read or is invalid, or onnxruntime cannot load
            it for the check (raised before any pass runs).
        DataError: the check data does not fit the model, or ``max_accuracy_drop`` was
            given and its labels cannot score accuracy or it has none (raised before any
            pass runs).
        RunFailedError: the model fails on the check's first sample (before any pass runs),
            or on a later one.
        CandidateFailedError: the result fails where the input runs, or its outputs are not
            the input's; where ``output`` is given, it is saved, and the error's ``model``
            holds it either way (as does a ``RunFailedError`` raised by the check). An error
            the check raises carries the whole unchecked ``ShrinkResult`` as ``result``.
        PassFailedError: a pass failed, or broke the tolerances under ``strict``.
        ShrinkError: options that do not fit together, a file the run would write over one
            it reads, an unavailable execution provider.
    """
    started = time.perf_counter()
    pass_list = spec.parse_spec(passes, sets, recipe)
    pass_order.warn_order(pass_list)
    if sensitivity and not any(isinstance(p, QuantPass) for p in pass_list):
        raise ShrinkError(f"{_NO_QUANT} (add quant to the passes, or drop --sensitivity)")
    input_shapes = preflight.parse_shapes(input_shapes)
    options = _check_options(check, data, input_shapes)
    read = {
        "the data": data,
        "the calibration data": calibration,
        "the check's data": options.data if options else None,
        "the labels": options.labels if options else None,
        "the recipe": recipe,
    }
    given = preflight.read_input(model, read, pass_list, dump_dir, output, external_data)
    reference, input_bytes = given.reference, given.input_bytes
    with contextlib.ExitStack() as stack:
        held = _held_inputs(pass_list)
        fold_freeze.check(given.model, held)  # before the data's values are warned about
        dataset, source = preflight.data_sources(given, options, calibration, data, stack, held)
        verifier = None
        if options is not None and options.verify_each:
            verifier = each_pass.verifier(
                reference, dataset, options.each_pass_tolerances(), options.provider
            )
        result, sensitivity_report, targets = _compile(
            model,
            given,
            pass_list,
            _Hooks(on_pass_start, on_calibration),
            source=source,
            input_shapes=options.input_shapes if options is not None else input_shapes,
            provider=options.provider if options else "cpu",
            verifier=verifier,
            strict=options.strict if options else False,
            dump_dir=dump_dir,
            sensitivity=sensitivity,
            held=held,
        )
        graph_edit.restore_names(result.model, given.naming)  # the nodes unnamed, as they came
        candidate, output_bytes, output_path = _save_candidate(result.model, output, external_data)
        compiled = time.perf_counter() - started
        if sensitivity_report is not None and targets.report is None:  # else the compile's
            compiled -= sensitivity_report.seconds
        io.detach_from_files(result.model)  # the caller may serialize it with any tool
        found = targets.outcomes(result.steps)
        finished = functools.partial(
            ShrinkResult,
            model=result.model,
            steps=_on_disk(result.steps, input_bytes, output_bytes),
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            output_path=output_path,
            compile_seconds=compiled,
            sensitivity=sensitivity_report,
            accuracy_targets=found,
        )
        report = None
        if options is not None:
            _warn_in_sample(result.steps, pass_list, calibration, options.data)
            try:
                progress = calibration_hooks.reporting(on_calibration, None)
                report = _check_candidate(
                    reference, candidate, dataset, options, output_path, progress
                )
                # Whose fixes to name, and the targets the check may show missed.
                report = dataclasses.replace(
                    report,
                    passes=tuple(step.name for step in result.steps if step.changed),
                    pipeline=tuple(step.name for step in result.steps),
                    targets=found,
                )
            except (RunFailedError, DataError) as e:
                e.model = result.model  # the unchecked result, kept where no file holds it
                # What was gained is known: the CLI still prints it and writes the reports.
                e.result = finished(
                    seconds=time.perf_counter() - started, verification=None, unchecked=str(e)
                )
                raise
    return finished(seconds=time.perf_counter() - started, verification=report)


_NO_QUANT = "sensitivity: the pipeline has no quant pass; nothing to measure"


def _held_inputs(pass_list: Sequence[ir.passes.PassBase]) -> dict[str, float]:
    """The inputs the pipeline's folds hold at one value (``fold.freeze``), the first fold's
    where two name one: its freeze removes the input, so a later fold's could not apply."""
    held: dict[str, float] = {}
    for pass_ in pass_list:
        if isinstance(pass_, FoldPass):
            for name, value in pass_.frozen.items():
                held.setdefault(name, value)
    return held


def _warn_in_sample(
    steps: Sequence[pipeline.StepRecord],
    pass_list: Sequence[ir.passes.PassBase],
    calibration: check_mod.DataSource,
    check_data: check_mod.DataSource,
) -> None:
    """Warn where the check runs on the data a pass fit weights to: lowrank on 64 crops of
    a 1152-wide layer read error 4.5e-6 there, 0.062 on other crops."""
    paths = all(isinstance(s, (str, os.PathLike)) for s in (calibration, check_data))
    same = calibration is None or calibration is check_data
    same = same or (paths and io.same_file(calibration, check_data))
    fitted = [
        p.name
        for p, step in zip(pass_list, steps, strict=False)
        if isinstance(p, DataAwarePass) and p.fits_weights_to_data
        if step.modified and step.calibration_samples
    ]
    if not (same and fitted):
        return
    who = " and ".join(dict.fromkeys(fitted))
    if check_data is None:  # both the same seeded synthetic inputs
        # PP-OCRv6 rec's lowrank checked at cosine 0.999999 there, 0.70 on rendered lines.
        where = f"the synthetic inputs {who} fit weights to: its figures can be far "
        advice = "real inputs (give --data real samples, and --calibration others)"
    else:
        where = f"the calibration data, which {who} fit weights to: its figures can be "
        advice = "new samples (give --data other samples than --calibration)"
    logger.warning("the check runs on %sbetter there than on %s", where, advice)


@dataclasses.dataclass(frozen=True)
class _Hooks:
    on_pass_start: pipeline.StepCallback | None
    on_calibration: CalibrationProgress | None


def _compile(
    source_model: io.ModelSource,
    given: preflight.Input,
    pass_list: Sequence[ir.passes.PassBase],
    hooks: _Hooks,
    *,
    source: check_mod.DataSource,
    input_shapes: Mapping[str, Sequence[int]] | None,
    provider: str,
    verifier: pipeline.Verifier | None,
    strict: bool,
    dump_dir: str | os.PathLike | None,
    sensitivity: bool,
    held: Mapping[str, float],
) -> tuple[
    pipeline.PipelineResult,
    sensitivity_mod.SensitivityReport | None,
    quant_targets.TargetPreparer,
]:
    """Run the pipeline (collecting calibration statistics for data-aware passes, meeting
    quant passes' accuracy targets) and, if asked, the sensitivity report; calibration data
    lives as long as this call."""
    loaded = given.model
    with contextlib.ExitStack() as stack:
        collector, prober, calib = None, None, None
        if any(isinstance(p, DataAwarePass) for p in pass_list):
            calib = calibration_hooks.calibration_data(
                loaded, source, input_shapes, stack, held, provider, given.where
            )
            collector = functools.partial(
                calibration_hooks.collect,
                dataset=calib,
                provider=provider,
                progress=hooks.on_calibration,
            )
            prober = functools.partial(
                probe_mod.measure,
                dataset=calib,
                provider=provider,
                progress=calibration_hooks.reporting(hooks.on_calibration, None),
            )
        # Without data-aware passes, no quant pass: the preparer is never called.
        targets = quant_targets.TargetPreparer(
            calib,
            provider,
            calibration_hooks.reporting(
                hooks.on_calibration, calib.samples if calib else None, "quant.max_error"
            ),
            sensitivity_mod.first_quant(pass_list) if sensitivity else None,
            given.naming,
        )
        first_sample = shapes.first_real_sample(loaded, calib, source)
        result = pipeline.run(
            loaded,
            pass_list,
            dump_dir=dump_dir,
            on_start=hooks.on_pass_start,
            verify=verifier,
            strict=strict,
            collect=collector,
            probe=prober,
            input_dims=shapes.sample_dims(loaded, first_sample, input_shapes),
            observe=shapes.observer(loaded, first_sample, input_shapes, provider),
            prepare=targets if any(map(quant_targets.targeted, pass_list)) else None,
            naming=given.naming,
        )
        report = targets.report
        if sensitivity and report is None:  # with a quant pass (shrink checked): a collector
            assert collector is not None and calib is not None
            report = sensitivity_mod.before_quant(
                source_model,
                pass_list,
                result.steps,
                collector,
                calib,
                provider,
                calibration_hooks.reporting(hooks.on_calibration, calib.samples, "sensitivity"),
            )
    return result, report, targets


def _check_candidate(
    reference: Path | bytes,
    candidate: Path | bytes,
    dataset: data_mod.Dataset,
    options: CheckOptions,
    output_path: Path | None,
    progress: Progress | None,
) -> check_mod.CheckReport:
    """The check of the result against the input; a run that fails, or a result onnx.checker
    rejects (a broken candidate: exit 3, not bad input), says where the (saved, unchecked)
    result is."""
    # Under --verify-each, the tolerances every pass was kept by judge the result too.
    tolerances = options.each_pass_tolerances() if options.verify_each else options.tolerances
    try:
        return check_mod.check(
            reference,
            candidate,
            dataset,
            tolerances=tolerances,
            provider=options.provider,
            layers=options.layers,
            latency_runs=options.latency_runs,
            latency_seconds=options.latency_seconds,
            progress=progress,
        )
    except (RunFailedError, DataError, errors.BadModelError) as failure:  # DataError: a later
        error = failure  # sample that does not fit
        if isinstance(failure, errors.BadModelError):  # onnx.checker rejects what passes made
            error = errors.CandidateFailedError(
                f"{failure} (the reference passes: the candidate is broken)"
            )
        if output_path is not None:
            error = type(error)(f"{error} (the result is saved, unchecked: {output_path})")
        if error is failure:
            raise
        raise error from failure


def _save_candidate(
    model: ir.Model, output: str | os.PathLike | None, external_data: bool | None
) -> tuple[bytes | Path, int, Path | None]:
    """Save to ``output`` (or serialize in memory): (session source, bytes, saved path)."""
    if output is None:
        candidate = io.to_bytes(model)
        return candidate, len(candidate), None
    saved = io.save(model, output, external_data=external_data)
    return saved.path, saved.bytes_on_disk, saved.path


def _on_disk(
    steps: tuple[pipeline.StepRecord, ...], input_bytes: int, output_bytes: int
) -> tuple[pipeline.StepRecord, ...]:
    """``steps`` with the first pass's bytes before and the last's after as the files take
    them on disk, as the total shows them: between passes, sizes are the model serialized
    (external data adds its own layout, from tens of bytes to kilobytes). A step that did not
    change the model keeps its sizes equal."""
    if not steps:
        return steps
    if steps[0].changed:
        steps = (dataclasses.replace(steps[0], bytes_before=input_bytes), *steps[1:])
    if steps[-1].changed:
        steps = (*steps[:-1], dataclasses.replace(steps[-1], bytes_after=output_bytes))
    return steps


def _check_options(
    check: bool | CheckOptions,
    data: check_mod.DataSource,
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> CheckOptions | None:
    if check is False:
        return None
    options = check if isinstance(check, CheckOptions) else CheckOptions()
    if data is not None and options.data is not None and data is not options.data:
        raise ShrinkError(
            "data= and CheckOptions(data=...) name two sources for the check: give the check's "
            "in CheckOptions and the calibration's as calibration="
        )
    if data is not None:
        options = dataclasses.replace(options, data=data)
    if options.input_shapes is None and input_shapes is not None:
        options = dataclasses.replace(options, input_shapes=input_shapes)
    if options.verify_each and options.data is not None and hasattr(options.data, "get_next"):
        raise DataError(
            "--verify-each reads the data after every pass; a reader object can be "
            "read only once: give a file or folder"
        )
    sessions.resolve_provider(options.provider)  # a misspelt --ep, before the compile
    return options


def default_output_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.shrunk.onnx`` beside it."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.shrunk.onnx")
