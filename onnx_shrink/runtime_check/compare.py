"""Numerics of a candidate model against its reference, accumulated batch by batch.

Per output: max and mean absolute error, cosine similarity (of the flattened outputs, over all
samples), and, with labels, task accuracy of both models. Accumulators keep sums, not
outputs, so memory stays at one batch whatever the number of samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How far one output of the candidate is from the reference's."""

    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    reference_max_abs: float
    elements: int

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NumericReport:
    """Per-output comparison and, with labels, accuracy of both models on the same samples."""

    outputs: tuple[OutputComparison, ...]
    samples: int
    data: str
    synthetic: bool
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class OutputAccumulator:
    """Streaming error statistics of one output; ``add`` a batch at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.ref_max = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise ValueError(
                f"output '{self.name}': shapes differ ({reference.shape} vs {candidate.shape})"
            )
        if reference.size == 0:
            return
        ref = reference.astype(np.float64, copy=False).ravel()
        cand = candidate.astype(np.float64, copy=False).ravel()
        diff = np.abs(ref - cand)
        self.max_abs = max(self.max_abs, float(np.max(diff)))
        self.sum_abs += float(np.sum(diff))
        self.count += ref.size
        self.dot += float(ref @ cand)
        self.ref_sq += float(ref @ ref)
        self.cand_sq += float(cand @ cand)
        self.ref_max = max(self.ref_max, float(np.max(np.abs(ref))))

    def result(self) -> OutputComparison:
        norms = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if norms > 0:
            cosine = self.dot / norms
        else:  # both all-zero outputs agree exactly; one zero and one not do not
            cosine = 1.0 if self.ref_sq == self.cand_sq else 0.0
        return OutputComparison(
            name=self.name,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / self.count if self.count else 0.0,
            cosine=cosine,
            reference_max_abs=self.ref_max,
            elements=self.count,
        )


class AccuracyAccumulator:
    """Top-1 accuracy of a classifier output against labels, for reference and candidate."""

    def __init__(self) -> None:
        self.correct_ref = 0
        self.correct_cand = 0
        self.total = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> None:
        self.correct_ref += int(np.sum(np.argmax(reference, axis=-1) == labels))
        self.correct_cand += int(np.sum(np.argmax(candidate, axis=-1) == labels))
        self.total += len(labels)

    def result(self) -> tuple[float | None, float | None]:
        if not self.total:
            return None, None
        return self.correct_ref / self.total, self.correct_cand / self.total


def is_classifier_output(array: np.ndarray, labels: np.ndarray) -> bool:
    """Does an output look like per-sample class scores for these labels?"""
    return array.ndim == 2 and array.shape[0] == len(labels) and array.shape[1] > 1


def compare_outputs(
    pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], np.ndarray | None]],
) -> tuple[list[OutputComparison], float | None, float | None]:
    """Fold (reference outputs, candidate outputs, labels) batches into per-output results."""
    accumulators: dict[str, OutputAccumulator] = {}
    accuracy = AccuracyAccumulator()
    for ref_out, cand_out, labels in pairs:
        for name, ref in ref_out.items():
            accumulators.setdefault(name, OutputAccumulator(name)).add(ref, cand_out[name])
        if labels is not None:
            first = next(iter(ref_out))
            if is_classifier_output(ref_out[first], labels):
                accuracy.add(ref_out[first], cand_out[first], labels)
    ref_acc, cand_acc = accuracy.result()
    return [a.result() for a in accumulators.values()], ref_acc, cand_acc
