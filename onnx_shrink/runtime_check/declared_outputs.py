"""Whether a model's outputs come out with the shapes it declares.

onnxruntime runs a model whose graph output declares ``[1, 10]`` while it computes
``[1, 12]`` and only logs it; the numbers compare equal, but what reads the declaration
(TensorRT, a runtime sizing its buffers, code generated from the signature) breaks on the
candidate. The check compares each output's declared fixed dims with what the first run
gave: a candidate declaring otherwise than its reference, wrongly, was broken by a pass; a
declaration both share is the input model's own, which the candidate keeps (a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.errors import CandidateFailedError

logger = logging.getLogger(__name__)

Declared = list[int | str | None] | None  # None: no shape declared (any rank)


def declared_shapes(model: ir.Model) -> dict[str, Declared]:
    """Each graph output's declared shape: ints for fixed dims, names or None for the
    others; None where no shape is declared."""
    shapes: dict[str, Declared] = {}
    for value in model.graph.outputs:
        shape = value.shape
        dims = None if shape is None else [d if isinstance(d, int) else d.value for d in shape]
        shapes[value.name or ""] = dims
    return shapes


def contradicts(declared: Declared, actual: Sequence[int]) -> bool:
    """Whether a run's ``actual`` shape breaks ``declared``: another rank, or a fixed dim of
    another size (named and unknown dims take any; no declared shape takes any rank)."""
    if declared is None:
        return False
    if len(declared) != len(actual):
        return True
    return any(isinstance(d, int) and d != a for d, a in zip(declared, actual, strict=True))


def check_first_run(
    reference: ir.Model,
    candidate: ir.Model,
    outputs: Mapping[str, np.ndarray],
    reference_label: str,
    candidate_label: str,
) -> None:
    """Raise ``CandidateFailedError`` where the candidate declares an output's shape
    otherwise than the reference and its run contradicts it; warn where both declare the
    same shape and the run contradicts it (``outputs``: the candidate's first run)."""
    theirs = declared_shapes(reference)
    ours = declared_shapes(candidate)
    for name, array in outputs.items():
        declared = ours.get(name)
        if not contradicts(declared, array.shape):
            continue
        computed = list(array.shape)
        if declared != theirs.get(name):
            raise CandidateFailedError(
                f"{candidate_label} declares output {name!r} with shape {declared} but "
                f"computes {computed}, where {reference_label} declares {theirs.get(name)}: "
                "what sizes its buffers from the model's signature would break (a pass that "
                "wrote the declaration broke the model)"
            )
        logger.warning(
            "check: %s declares output %r with shape %s but computes %s; the result keeps "
            "that declaration, as it came",
            reference_label,
            name,
            declared,
            computed,
        )
