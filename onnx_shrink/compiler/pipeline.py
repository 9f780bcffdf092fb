"""Running passes with instruments: per pass, wall time and the model's accounting before
and after, calibration statistics for data-aware passes, verification and rollback (specs
are parsed by ``compiler.spec``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx_ir as ir

from onnx_shrink.compiler import dumps, figures, graph_edit, io, stats, tensor_patterns
from onnx_shrink.compiler.data_aware import BoundPass, Collector, DataAwarePass, Look, Prober
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.compiler.pass_results import MeasuredResult
from onnx_shrink.compiler.spec import describe
from onnx_shrink.compiler.statistics import Statistics, StatRequest
from onnx_shrink.errors import (
    PassFailedError,
    ShrinkError,
    ToleranceStopError,
)
from onnx_shrink.wording import human_bytes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one pass did: its spec, time, whether it changed the model, accounting around it."""

    index: int
    spec: str
    seconds: float
    modified: bool
    before: stats.ModelStats
    after: stats.ModelStats
    bytes_before: int
    bytes_after: int
    dump_path: str | None
    rolled_back: bool = False
    verdict: str | None = None
    calibration_seconds: float = 0.0
    calibration_samples: int | None = None
    note: str = ""
    """what the pass says it did where counts and sizes do not show it (``NotedResult``)"""
    prepare_seconds: float = 0.0
    """spent by ``run``'s ``prepare`` before the pass (``quant.max_error``'s search)"""
    probe_seconds: float = 0.0
    """spent measuring the output error of the pass's trial edits (``DataAwarePass.probes``:
    lowrank's candidate ranks), after its calibration and not part of it"""
    probes: int = 0
    """trial edits measured"""

    @property
    def name(self) -> str:
        """The pass's name, without the options ``spec`` shows."""
        return self.spec.partition("(")[0]

    @property
    def changed(self) -> bool:
        """Whether the model out of the pipeline holds this pass's edits."""
        return self.modified and not self.rolled_back

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    model: ir.Model
    steps: tuple[StepRecord, ...]


StepCallback = Callable[[int, ir.passes.PassBase], None]

Preparer = Callable[[int, ir.passes.PassBase, ir.Model], ir.passes.PassBase]
"""Called as pass ``index``'s turn comes, with the model it will get (to read, not to
change): returns the pass to run in its place (``shrink`` meets ``quant.max_error`` so)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a verifier says of the model after a pass."""

    ok: bool
    summary: str


Verifier = Callable[[ir.Model], Verdict]


def run(
    model: ir.Model,
    passes: Sequence[ir.passes.PassBase],
    *,
    dump_dir: str | Path | None = None,
    on_start: StepCallback | None = None,
    verify: Verifier | None = None,
    strict: bool = False,
    collect: Collector | None = None,
    probe: Prober | None = None,
    input_dims: stats.Shapes | None = None,
    observe: figures.ShapeObserver | None = None,
    prepare: Preparer | None = None,
    naming: graph_edit.Naming | None = None,
) -> PipelineResult:
    """Run ``passes`` in order on ``model`` (which may be rewritten in place).

    A data-aware pass gets statistics from ``collect``, run on the model as it is when the
    pass's turn comes, and the output errors of its ``probes`` from ``probe``. MACs are
    counted per sample of ``input_dims`` (graph input -> dims) where given, on the dims of a
    real run (``observe``) where inferred shapes leave the count a bound. With
    ``verify``, the model is judged after every pass; a pass it rejects is rolled back (the
    model before it continues down the pipeline) or, with ``strict``, stops the run. With
    ``prepare``, each pass runs as it says (the step records the pass that ran). Sizes are
    the model's once the names ``naming`` gave are taken back (``graph_edit.restore_names``),
    as it will be written.

    Raises:
        PassFailedError: a pass raised, or broke the verifier under ``strict``; the message
            names the pass and those before it.
    """
    if dump_dir is not None:
        dumps.make_dump_dir(dump_dir)
    pipeline = _Pipeline(
        dump_dir, on_start, verify, strict, collect, probe, input_dims, observe, prepare, naming
    )
    # The input's figures are final after the first pass: a run for its dims goes on beside it
    # (none without a pass, which would not wait for it).
    input_figures = figures.Figures.start(
        model, input_dims, observe if passes else None, pipeline.observed
    )
    try:
        return pipeline.run(model, passes, input_figures)
    except Exception:  # not on Ctrl-C: the run for dims is not waited for then
        input_figures.abandon()
        raise


@dataclasses.dataclass
class _Pipeline:
    """``run``'s options, and what it carries from one pass to the next."""

    dump_dir: str | Path | None
    on_start: StepCallback | None
    verify: Verifier | None
    strict: bool
    collect: Collector | None
    probe: Prober | None
    input_dims: stats.Shapes | None
    observe: figures.ShapeObserver | None
    prepare: Preparer | None
    naming: graph_edit.Naming | None
    # Dims a real run gave, by value name: kept across passes that keep every tensor's shape
    # (all but ``changes_shapes`` ones), so one run serves the whole pipeline's accounting.
    observed: dict[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    current_stats: stats.ModelStats | None = None  # the model's before the next pass
    # The input's size is taken before a pass that may change it (a data-aware pass, in
    # place, from before its requests); after a functional one, from its MeasuredResult.
    current_bytes: int | None = None

    def run(
        self, model: ir.Model, passes: Sequence[ir.passes.PassBase], input_figures: figures.Figures
    ) -> PipelineResult:
        for index, pass_ in enumerate(passes):
            model = self._step(index, pass_, model, input_figures)
        return PipelineResult(model=model, steps=tuple(self.steps))

    def _step(
        self, index: int, pass_: ir.passes.PassBase, model: ir.Model, input_figures: figures.Figures
    ) -> ir.Model:
        """Run one pass and record its step; the model the next pass gets."""
        if self.on_start is not None:
            self.on_start(index, pass_)
        prepare_seconds = time.perf_counter()
        pass_ = tensor_patterns.resolved(pass_, model)  # a tensor's name for its writer's
        if self.prepare is not None:
            with _failing_as(describe(pass_), self.steps):
                pass_ = self.prepare(index, pass_, model)
        prepare_seconds = time.perf_counter() - prepare_seconds
        if self.current_bytes is None and pass_.changes_input:
            self.current_bytes = self._saved_bytes(model)
        # Taken before a data-aware pass's requests, which may rewrite the model (quant
        # converts its opset and infers types before it knows whether it will quantize): a
        # rolled-back pass, or one that changed nothing, leaves the model as it found it.
        snapshot = _snapshot(model, pass_)  # the model itself where the pass is functional
        bound = _bind(pass_, model, self.collect, self.probe, self.steps)
        result, seconds, rejected, verdict = _run_one(
            bound.pass_, model, snapshot, self.steps, self.verify, self.strict
        )
        if self.current_stats is None:  # the snapshot is the input, as it was measured
            self.current_stats = input_figures.final(snapshot, self.input_dims, self.observed)
        # A follow-up's calibration is calibration time, not the pass's.
        calibration_seconds = bound.calibration_seconds + bound.followup_seconds
        seconds -= bound.followup_seconds
        if self.current_bytes is None:  # the pass left its input as it was
            self.current_bytes = (
                result.bytes_before if self._measured(result) else self._saved_bytes(model)
            )
        # Unchanged, the model goes on as it was: quant on an already-int8 model raised its
        # opset and inferred types, then said no change.
        model = result.model if result.modified else snapshot
        if result.modified and isinstance(pass_, DataAwarePass) and pass_.changes_shapes:
            self.observed.clear()
        # Unchanged, it measures as it did (and a bound left is not run for again).
        after = self._measure(model) if result.modified else self.current_stats
        step = StepRecord(
            index=index,
            spec=describe(pass_),
            seconds=seconds,
            modified=result.modified,
            before=self.current_stats,
            after=after,
            bytes_before=self.current_bytes,
            bytes_after=self._bytes_after(result, model),
            dump_path=self._dump(index, pass_, model, rejected),
            rolled_back=rejected is not None,
            verdict=verdict,
            calibration_seconds=calibration_seconds,
            calibration_samples=bound.samples,
            note=getattr(result, "note", ""),  # a rolled-back pass's result has none
            prepare_seconds=prepare_seconds,
            probe_seconds=bound.probe_seconds,
            probes=bound.probes,
        )
        self.steps.append(step)
        logger.info("%s: %.2fs, %d -> %d nodes", step.spec, seconds, step.before.nodes, after.nodes)
        if not getattr(pass_, "widens", False):
            _warn_if_grown(step)
        self.current_stats, self.current_bytes = after, step.bytes_after
        return model

    def _bytes_after(self, result: ir.passes.PassResult, model: ir.Model) -> int:
        """The step's result's size: a functional pass measured it; unchanged, the model is
        the one measured before the step (no second serialization)."""
        if self._measured(result):
            return result.bytes_after
        if not result.modified:
            assert self.current_bytes is not None
            return self.current_bytes
        return self._saved_bytes(model)

    def _measured(self, result: ir.passes.PassResult) -> bool:
        """Whether the pass measured its sizes as the model will be written: a functional
        pass did, unless nodes carry names given for the run (its measure counts them)."""
        renamed = self.naming is not None and bool(self.naming.given)
        return isinstance(result, MeasuredResult) and not renamed

    def _saved_bytes(self, model: ir.Model) -> int:
        """The size ``model`` takes once written, without the names given for the run (the
        graph alone is serialized: weights are counted by size)."""
        return large_tensors.saved_bytes(model, naming=self.naming)

    def _measure(self, model: ir.Model) -> stats.ModelStats:
        return figures.measure(model, self.input_dims, self.observe, self.observed)

    def _dump(self, index, pass_, model, rejected) -> Path | None:
        if self.dump_dir is None:
            return None
        return dumps.dump(Path(self.dump_dir), index, pass_, model, rejected)


@dataclasses.dataclass(frozen=True)
class _Bound:
    """A pass ready to run, and what binding it took."""

    pass_: ir.passes.PassBase
    calibration_seconds: float = 0.0
    samples: int | None = None
    probe_seconds: float = 0.0
    probes: int = 0
    followup: _TimedCollector | None = None
    """what serves the pass's follow-up, timing it as it runs"""

    @property
    def followup_seconds(self) -> float:
        """Spent so far collecting the follow-up's statistics (after the run: all of it)."""
        return self.followup.seconds if self.followup is not None else 0.0


def _bind(
    pass_: ir.passes.PassBase,
    model: ir.Model,
    collect: Collector | None,
    probe: Prober | None,
    done: Sequence[StepRecord],
) -> _Bound:
    """A data-aware pass bound to the statistics collected on ``model`` (and to ``collect``,
    timed, for its follow-up), with the seconds its calibration and its probes took; any
    other pass as it is. What its ``requests`` raise fails as the pass would."""
    if not isinstance(pass_, DataAwarePass):
        return _Bound(pass_)
    started = time.perf_counter()
    with _failing_as(describe(pass_), done):
        statistics = _collect(pass_, model, collect)
        calibrated = time.perf_counter()
        if statistics is None:  # a data-aware pass in a data-free mode (magnitude pruning)
            statistics = Statistics(results={}, samples=0, source="none needed")
        else:
            statistics = _probe(pass_, model, statistics, probe)
    probe_seconds = time.perf_counter() - calibrated  # before ``bind``: its time is no probe's
    probes = len(statistics.probe_errors)
    followup = _TimedCollector(collect) if collect is not None else None
    return _Bound(
        pass_.bind(statistics, followup),
        calibration_seconds=calibrated - started,
        samples=statistics.samples,
        probe_seconds=probe_seconds if probes else 0.0,
        probes=probes,
        followup=followup,
    )


@contextlib.contextmanager
def _failing_as(spec: str, done: Sequence[StepRecord]) -> Iterator[None]:
    """What the body raises fails pass ``spec`` (``_failure``), except a ``ShrinkError``,
    which says what it is already, and running out of memory, which is no failure of the
    pass's logic."""
    try:
        yield
    except (ShrinkError, MemoryError):
        raise
    except Exception as e:
        raise _failure(spec, done, e) from e


class _TimedCollector:
    """A collector adding up the seconds it spends in the calls it serves."""

    def __init__(self, collect: Collector) -> None:
        self.collect = collect
        self.seconds = 0.0

    def __call__(
        self, model: ir.Model, requests: Sequence[StatRequest], look: Look | None = None
    ) -> Statistics:
        started = time.perf_counter()
        try:
            return self.collect(model, requests, look)
        finally:
            self.seconds += time.perf_counter() - started


def _collect(pass_: DataAwarePass, model: ir.Model, collect: Collector | None) -> Statistics | None:
    """The statistics the pass requests on ``model``; None where it requests none (a mode
    that needs no data: magnitude pruning, plain SVD)."""
    requests = list(pass_.requests(model))
    if not requests:
        return None
    if collect is None:
        raise PassFailedError(
            f"pass '{describe(pass_)}' needs calibration data, and this pipeline has none"
        )
    return collect(model, requests)


def _probe(
    pass_: DataAwarePass, model: ir.Model, statistics: Statistics, probe: Prober | None
) -> Statistics:
    """``statistics`` with the output errors of the pass's probes, if it has any."""
    probes = list(pass_.probes(model, statistics))
    if not probes:
        return statistics
    if probe is None:
        raise PassFailedError(
            f"pass '{describe(pass_)}' measures model outputs on calibration data, and this "
            "pipeline cannot run the model (give run() a probe)"
        )
    errors = probe(model, probes, budget=pass_.probe_budget())
    return dataclasses.replace(statistics, probe_errors=dict(errors))


def _run_one(
    pass_: ir.passes.PassBase,
    model: ir.Model,
    snapshot: ir.Model,
    done: Sequence[StepRecord],
    verify: Verifier | None,
    strict: bool,
) -> tuple[ir.passes.PassResult, float, ir.Model | None, str | None]:
    """Run one pass (and its verification): (result, seconds, the pass's output where it was
    rolled back else None, verdict); ``snapshot``: the model to roll back to."""
    spec = describe(pass_.inner if isinstance(pass_, BoundPass) else pass_)
    started = time.perf_counter()
    with _failing_as(spec, done):
        result = pass_(model)
    seconds = time.perf_counter() - started
    if verify is None or not result.modified:
        return result, seconds, None, None
    judged = verify(result.model)
    if judged.ok:
        return result, seconds, None, judged.summary
    if strict:
        raise ToleranceStopError(f"pass '{spec}' broke the tolerances: {judged.summary}")
    logger.warning("pass '%s' broke the tolerances (%s); rolled back", spec, judged.summary)
    return ir.passes.PassResult(snapshot, False), seconds, result.model, judged.summary


def _failure(spec: str, done: Sequence[StepRecord], error: Exception) -> Exception:
    """What a pass's unexpected ``error`` becomes: the ``MemoryError`` it wraps (onnx_ir's
    pass managers wrap what their passes raise), else a ``PassFailedError`` naming the pass
    and the passes before it."""
    memory = _memory_error(error)
    if memory is not None:
        return memory
    before = ", ".join(s.spec for s in done) or "none"
    return PassFailedError(
        f"pass '{spec}' failed (passes before it: {before}): {_root_message(error)}"
    )


GROWTH_WARNED_BYTES = 512
"""A modified step whose result is larger than its input by more than this is warned of:
the summary's bytes column alone let quant's +23.5 KiB on an int8 Whisper encoder pass
unremarked (with quant.activation_matmuls=true it added Q/DQ and quantized nothing). Less
is the bookkeeping a rewrite may add (an opset import, a renamed value)."""


def _warn_if_grown(step: StepRecord) -> None:
    """Say so where ``step`` (modified) left the model larger than it found it."""
    grown = step.bytes_after - step.bytes_before
    if step.modified and grown > GROWTH_WARNED_BYTES:
        logger.warning(
            "%s: the result takes more bytes than its input (%s -> %s, +%s)",
            step.spec,
            human_bytes(step.bytes_before),
            human_bytes(step.bytes_after),
            human_bytes(grown),
        )


def _snapshot(model: ir.Model, pass_: ir.passes.PassBase) -> ir.Model:
    """The model to roll back to: a copy, unless the pass leaves its input as it was (a
    data-aware pass is in place: its requests may change the model too)."""
    if not pass_.changes_input:
        return model  # a functional pass leaves its input as it was
    clone = model.clone()
    io.unshare_tensors(clone)
    return clone


def _memory_error(error: BaseException | None) -> MemoryError | None:
    """The ``MemoryError`` ``error`` wraps, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _root_message(error: BaseException) -> str:
    """The innermost cause's message; onnx_ir wraps pass errors in several layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
