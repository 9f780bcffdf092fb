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
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnx_shrink.compiler.statistics import Statistics, StatRequest

Edit = Callable[[ir.Model], None]
"""Rewrites, in place, a copy of the model a pass was given."""


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


class DataAwarePass(ir.passes.InPlacePass):
    """Base of passes that need tensor statistics (see module docstring)."""

    @abc.abstractmethod
    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        """The statistics this pass needs for ``model``, which it may prepare in place for
        ``apply`` (quant converts its opset and infers types): statistics are collected on
        the model as it then is."""

    def probes(self, model: ir.Model, stats: Statistics) -> Sequence[Probe]:
        """Edits of ``model`` whose output error ``apply`` wants in ``stats.probe_errors``
        (none by default)."""
        return ()

    @abc.abstractmethod
    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        """Rewrite ``model`` in place from ``stats``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ir.passes.PreconditionError(
            f"pass '{getattr(self, 'name', type(self).__name__)}' needs calibration statistics: "
            "run it through onnx_shrink.shrink() (which collects them) or call "
            "pass_.bind(statistics)(model)"
        )

    def bind(self, stats: Statistics) -> BoundPass:
        """This pass with ``stats``, runnable like any in-place pass."""
        return BoundPass(self, stats)


@dataclasses.dataclass(frozen=True)
class BoundPass(ir.passes.InPlacePass):
    """A data-aware pass together with the statistics for one run."""

    inner: DataAwarePass
    stats: Statistics

    @property
    def name(self) -> str:
        return getattr(self.inner, "name", type(self.inner).__name__)

    def requires(self, model: ir.Model) -> None:
        self.inner.requires(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return self.inner.apply(model, self.stats)
