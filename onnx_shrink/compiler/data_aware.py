"""Data-aware passes: passes that rewrite the graph from calibration statistics.

Such a pass says what it needs (``requests``) and rewrites from what it gets (``apply``); the
pipeline collects the statistics on the model as it is when the pass's turn comes (after the
passes before it) and binds them to the pass for that one run. The pass itself never runs a
model and stays a frozen configuration.

A pass may also ask how much the *model's outputs* move under candidate edits (``probes``,
given the statistics): the pipeline measures each edit alone on the calibration data
(``runtime_check.probe``) and hands the errors back in ``Statistics.probe_errors``. An edit
made from the statistics is judged on the data it was fitted to unless the probe can be
``remade`` from statistics of part of the data: then it is measured out of sample.

A pass may also look at the data a second time, after ``apply`` (``Followup``): its result
then says what to measure on a model it built (its rewritten model with reductions beside
the rewritten nodes, say), and how to finish the rewrite from those statistics.
Quantization corrects its biases so: the drift of a quantized layer is a statistic of the
quantized model, not of the float one.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

import onnx_ir as ir

from onnx_shrink.compiler.pass_results import NotedResult
from onnx_shrink.compiler.statistics import Statistics, StatRequest
from onnx_shrink.errors import ShrinkError

logger = logging.getLogger(__name__)

Edit = Callable[[ir.Model], None]
"""Rewrites, in place, a copy of the model a pass was given."""


@dataclasses.dataclass(frozen=True)
class Look:
    """How one collection reads the calibration data."""

    samples: int = 0
    """its first this many samples (0: all of them)"""
    run_samples: int = 0
    """at most this many samples in one run (0: as the collector decides from the requested
    tensors, which may not show what the model itself holds)"""
    purpose: str = ""
    """what the collection is for, as progress reports name it ("bias correction")"""


class Collector(Protocol):
    """Runs ``model`` over the calibration data, read as ``look`` says (None: all of it, as
    the collector decides), and returns the statistics ``requests`` ask for."""

    def __call__(
        self, model: ir.Model, requests: Sequence[StatRequest], look: Look | None = None
    ) -> Statistics: ...


class Prober(Protocol):
    """Measures each probe's edit of ``model`` alone (where ``budget`` cannot cover them all,
    some of those of the highest ``Probe.priority`` values are left out): key -> relative
    squared error of the model outputs."""

    def __call__(
        self, model: ir.Model, probes: Sequence[Probe], *, budget: ProbeBudget | None
    ) -> Mapping[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Followup:
    """A second look at the calibration data, asked by ``apply``: the pipeline collects
    ``requests`` on ``model`` and calls ``finish`` with the pass's result, which it edits in
    place, and those statistics (None where nothing can collect them, or the collection
    failed: ``finish`` then completes the result without them). ``model`` may be the result
    itself with nodes added for the measurement, which ``finish`` takes out again."""

    model: ir.Model
    requests: tuple[StatRequest, ...]
    finish: Callable[[ir.Model, Statistics | None], None]
    look: Look = Look()


@dataclasses.dataclass
class FollowupResult(ir.passes.PassResult):
    """What ``apply`` returns when it wants a second look at the data (``Followup``), with
    its ``note`` for the summary (``NotedResult``)."""

    followup: Followup | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Probe:
    """A candidate edit whose effect on the model's outputs a pass wants measured: ``edit``
    rewrites, in place, a copy of the model the pass was given (found by node names)."""

    key: str
    edit: Edit
    remade: Callable[[Statistics], Edit] | None = None
    """the same edit made from ``requests`` collected on part of the calibration data, so
    that it can be measured on the rest (held out); None: ``edit`` is measured as it is"""
    requests: tuple[StatRequest, ...] = ()
    """what ``remade`` reads"""
    nodes: tuple[str, ...] = ()
    """the names of the nodes the edits rewrite, if known: the copy they are made on may then
    hold only those nodes and the ones downstream of them (``runtime_check.combined``)"""
    priority: int = 0
    """where the pass's ``ProbeBudget`` cannot cover every probe, those not yet measured keep
    the lowest priorities that fit (0 at least), and the others are left out"""


@dataclasses.dataclass(frozen=True)
class ProbeBudget:
    """How long a pass's probes may take, and the option that says so (for the warning)."""

    seconds: float
    option: str


class DataAwarePass(ir.passes.InPlacePass):
    """Base of passes that need tensor statistics (see module docstring)."""

    changes_shapes: ClassVar[bool] = False
    """The pass may change tensors' shapes under their names: dims a run gave before it do
    not hold after it."""

    @property
    def fits_weights_to_data(self) -> bool:
        """With its options, the pass fits weights to its calibration data, so a check on
        that same data is in-sample (calibrated ranges alone are not counted: a few numbers
        a tensor)."""
        return False

    @abc.abstractmethod
    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        """The statistics this pass needs for ``model``, which it may prepare in place for
        ``apply`` (quant converts its opset and infers types): statistics are collected on
        the model as it then is."""

    def probes(self, model: ir.Model, stats: Statistics) -> Sequence[Probe]:
        """Edits of ``model`` whose output error ``apply`` wants in ``stats.probe_errors``
        (none by default). Some may be left out of the measurements (``probe_budget``)."""
        return ()

    def probe_budget(self) -> ProbeBudget | None:
        """The time the probes may take (None: no limit)."""
        return None

    @abc.abstractmethod
    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        """Rewrite ``model`` in place from ``stats``; a ``FollowupResult`` asks for
        statistics of a model built from the result before the rewrite is finished."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ir.passes.PreconditionError(
            f"pass '{getattr(self, 'name', type(self).__name__)}' needs calibration statistics: "
            "run it through onnx_shrink.shrink() (which collects them) or call "
            "pass_.bind(statistics)(model)"
        )

    def bind(self, stats: Statistics, collect: Collector | None = None) -> BoundPass:
        """This pass with ``stats``, runnable like any in-place pass; ``collect`` serves
        its ``Followup`` (without it, the rewrite is finished without the second look)."""
        return BoundPass(self, stats, collect)


@dataclasses.dataclass(frozen=True)
class BoundPass(ir.passes.InPlacePass):
    """A data-aware pass together with the statistics for one run, and what collects those
    of its follow-up."""

    inner: DataAwarePass
    stats: Statistics
    collect: Collector | None = None

    @property
    def name(self) -> str:
        return getattr(self.inner, "name", type(self.inner).__name__)

    def requires(self, model: ir.Model) -> None:
        self.inner.requires(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner.apply(model, self.stats)
        followup = result.followup if isinstance(result, FollowupResult) else None
        if followup is None:
            return result
        seen = None
        if self.collect is not None and followup.requests:
            try:
                seen = self.collect(followup.model, followup.requests, followup.look)
            except ShrinkError as e:  # a refinement: the pass's result stands without it
                logger.warning("%s: the second look at the data failed (%s)", self.name, e)
        followup.finish(result.model, seen)
        return NotedResult(result.model, result.modified, result.note)
