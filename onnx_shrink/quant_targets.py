"""``shrink``'s side of ``quant.max_error``: the pipeline's ``Preparer`` that runs each quant
pass with an accuracy target as ``runtime_check.accuracy_target`` finds it should, on the
model the pass gets, and keeps what was found for the result and its reports."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, pipeline, spec
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import accuracy_target
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.progress import Progress
from onnx_shrink.runtime_check.sensitivity_report import SensitivityReport


def targeted(pass_: ir.passes.PassBase) -> bool:
    """Whether ``pass_`` is a quant pass with an accuracy target."""
    return isinstance(pass_, QuantPass) and not math.isinf(pass_.max_error)


class TargetPreparer:
    """``pipeline.Preparer``: a quant pass with ``max_error`` runs with the worst layers
    added to its ``exclude`` (``accuracy_target.meet_target``); other passes as they are.

    ``dataset``: the calibration data (None in a pipeline without data-aware passes, where
    no quant pass can come). ``report_index``: the pass whose sensitivity report the run
    wants (the first quant pass, with ``shrink(sensitivity=True)``), or None. Where that
    pass has a target, the search's report serves (its hint measured as well): ``report``
    then holds it. ``naming``: the names the run gave unnamed nodes, which the sizes leave
    out as the written result does.
    """

    def __init__(
        self,
        dataset: data_mod.Dataset | None,
        provider: str,
        progress: Progress | None,
        report_index: int | None,
        naming: graph_edit.Naming | None = None,
    ) -> None:
        self.dataset, self.provider, self.progress = dataset, provider, progress
        self.report_index, self.naming = report_index, naming
        self.found: list[accuracy_target.TargetOutcome] = []
        self.report: SensitivityReport | None = None

    def __call__(
        self, index: int, pass_: ir.passes.PassBase, model: ir.Model
    ) -> ir.passes.PassBase:
        if not targeted(pass_):
            return pass_
        assert isinstance(pass_, QuantPass) and self.dataset is not None
        reported = index == self.report_index
        prepared, outcome, report = accuracy_target.meet_target(
            model,
            pass_,
            self.dataset,
            provider=self.provider,
            progress=self.progress,
            hint=reported,
            naming=self.naming,
        )
        if outcome is not None:
            given = spec.describe(pass_)
            self.found.append(dataclasses.replace(outcome, pass_index=index, spec=given))
        if reported:
            self.report = report
        return prepared

    def outcomes(
        self, steps: Sequence[pipeline.StepRecord]
    ) -> tuple[accuracy_target.TargetOutcome, ...]:
        """What each search found, marked where ``--verify-each`` then rolled its pass back
        (``steps``: the pipeline's)."""
        return tuple(
            dataclasses.replace(outcome, rolled_back=steps[outcome.pass_index].rolled_back)
            for outcome in self.found
        )
