"""Whether a model's outputs come out with the shapes it declares.

onnxruntime runs a model whose graph output declares ``[1, 10]`` while it computes
``[1, 12]`` and only logs it; the numbers compare equal, but what reads the declaration
(TensorRT, a runtime sizing its buffers, code generated from the signature) breaks on the
candidate. The check compares each output's declared fixed dims with what the first run
gave: where the reference's declaration fits the run and the candidate's does not, a pass
broke the candidate; where neither fits, the wrong declaration is the input model's own,
which the candidate keeps (a warning, once a run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnx_shrink.errors import CandidateFailedError
from onnx_shrink.runtime_check.data_types import declared_dims
from onnx_shrink.warning_records import warn_once

logger = logging.getLogger(__name__)

Declared = list[int | str | None] | None  # None: no shape declared (any rank)


class Labelled(Protocol):
    """A model and the name the check gives it (checker's loaded models)."""

    model: ir.Model
    label: str


def declared_shapes(model: ir.Model) -> dict[str, Declared]:
    """Each graph output's declared shape: ints for fixed dims, names or None for the
    others; None where no shape is declared."""
    return {
        value.name or "": None if value.shape is None else declared_dims(value.shape)
        for value in model.graph.outputs
    }


def contradicts(declared: Declared, actual: Sequence[int]) -> bool:
    """Whether a run's ``actual`` shape breaks ``declared``: another rank, or a fixed dim of
    another size (named, unknown and non-positive dims take any; no declared shape takes
    any rank)."""
    if declared is None:
        return False
    if len(declared) != len(actual):
        return True
    return any(
        isinstance(d, int) and d > 0 and d != a for d, a in zip(declared, actual, strict=True)
    )


def check_first_run(
    reference: Labelled, candidate: Labelled, outputs: Mapping[str, np.ndarray]
) -> None:
    """Raise ``CandidateFailedError`` where the candidate's first run (``outputs``)
    contradicts its declaration of an output's shape while the reference's declaration fits
    that run; warn where both declarations are contradicted."""
    theirs = declared_shapes(reference.model)
    ours = declared_shapes(candidate.model)
    for name, array in outputs.items():
        declared = ours.get(name)
        if not contradicts(declared, array.shape):
            continue
        computed, expected = list(array.shape), theirs.get(name)
        if not contradicts(expected, array.shape):
            raise CandidateFailedError(
                f"{candidate.label} declares output {name!r} with shape {declared} but "
                f"computes {computed}, where {reference.label} declares {expected}: "
                "what sizes its buffers from the model's signature would break (a pass that "
                "wrote the declaration broke the model)"
            )
        warn_once(
            logger,
            f"check: {reference.label} declares output {name!r} with shape "
            f"{expected} but computes {computed}, and so does {candidate.label} "
            f"(declared {declared})",
            # One fact, however labelled: quant.max_error's measurements check "reference"
            # against "candidate" before the check names their files (ddddocr: said twice).
            key=f"declared output {name!r} computes {computed}",
        )
