"""The judge ``--verify-each`` runs after every pass: the model as the pass left it against
the input, on the check's data and tolerances."""

from __future__ import annotations

import math

import onnx_ir as ir

from onnx_shrink.compiler import io, pipeline
from onnx_shrink.errors import CandidateFailedError
from onnx_shrink.runtime_check import checker as check_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.compare import Tolerances


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
        worst = min((o.cosine for o in report.outputs), default=1.0, key=_nan_lowest)
        summary = "; ".join(report.failures) or f"lowest output cosine {worst:.6f}"
        return pipeline.Verdict(ok=report.passed, summary=summary)

    return verify


def _nan_lowest(cosine: float) -> float:
    """Sort key: a NaN cosine (NaN/Inf outputs, not comparable) is the lowest."""
    return -math.inf if math.isnan(cosine) else cosine
