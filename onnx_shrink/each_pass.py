"""The judge ``--verify-each`` runs after every pass: the model as the pass left it against
the input, on the check's data and tolerances."""

from __future__ import annotations

import math

import onnx_ir as ir

from onnx_shrink.compiler import io, pipeline
from onnx_shrink.errors import CandidateFailedError
from onnx_shrink.runtime_check import checker as check_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.numeric_report import NumericReport, Tolerances


def verifier(
    reference: check_mod.AnyModel,
    dataset: data_mod.Dataset,
    tolerances: Tolerances,
    provider: str,
) -> pipeline.Verifier:
    """A ``pipeline.Verifier``: a pass's result passes where it keeps ``tolerances`` against
    ``reference``; one onnxruntime cannot run fails (the pipeline rolls it back)."""

    def verify(model: ir.Model) -> pipeline.Verdict:
        try:
            report = check_mod.compare(
                reference, io.to_bytes(model), dataset, tolerances=tolerances, provider=provider
            )
        except CandidateFailedError as e:  # the pass broke the model: roll it back
            return pipeline.Verdict(ok=False, summary=str(e))
        summary = "; ".join(report.failures) or _closest_call(report)
        return pipeline.Verdict(ok=report.passed, summary=summary)

    return verify


def _closest_call(report: NumericReport) -> str:
    """What came nearest to failing: the lowest cosine of a float output, and the lowest
    share of equal elements of an integer one."""
    floats = [o.cosine for o in report.outputs if not o.integral]
    integers = [o.agreement for o in report.outputs if o.integral]
    parts = []
    if floats or not integers:
        parts.append(f"lowest output cosine {min(floats, default=1.0, key=_nan_lowest):.6f}")
    if integers:
        parts.append(f"lowest integer output agreement {min(integers):.2%}")
    return ", ".join(parts)


def _nan_lowest(cosine: float) -> float:
    """Sort key: a NaN cosine (NaN/Inf outputs, not comparable) is the lowest."""
    return -math.inf if math.isnan(cosine) else cosine
