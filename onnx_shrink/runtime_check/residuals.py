"""Outputs that carry an input through, and the error of what the model adds to it.

A watermark encoder, a denoiser or a refiner outputs its input plus a change. An output's
relative error is measured against the whole output, so the input's share hides the change's
error: RivaGAN's pruned encoder read 0.0198 while its residual (2.3% of the frame) was off
by 0.86, and 11% of the watermark's bits flipped. Where an output has an input's shape and
lies within ``RESIDUAL_SHARE`` of it, the check measures the residual's error too:
``||c - r|| / ||r - x||`` (candidate, reference, input), streamed as ``compare`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import numpy as np

from onnx_shrink.runtime_check.compare import CHUNK_ELEMENTS
from onnx_shrink.runtime_check.numeric_report import NumericReport

RESIDUAL_SHARE = 0.5
"""The largest ``||r - x|| / ||r||`` at which an output counts as its input plus a residual:
beyond it the output is mostly the model's own, and its error says enough."""


class ResidualAccumulator:
    """``||r - x||^2``, ``||c - r||^2`` and ``||r||^2`` of one output against one input of
    its shape, over the elements finite in all three; ``add`` a batch at a time."""

    def __init__(self, output: str, source: str) -> None:
        self.output = output
        self.source = source
        self.residual_sq = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray, source: np.ndarray) -> None:
        ref_all, cand_all, src_all = reference.ravel(), candidate.ravel(), source.ravel()
        for start in range(0, ref_all.size, CHUNK_ELEMENTS):
            part = slice(start, start + CHUNK_ELEMENTS)
            ref = ref_all[part].astype(np.float64)
            cand = cand_all[part].astype(np.float64)
            src = src_all[part].astype(np.float64)
            finite = np.isfinite(ref) & np.isfinite(cand) & np.isfinite(src)
            if not finite.all():
                ref, cand, src = ref[finite], cand[finite], src[finite]
            residual, diff = ref - src, cand - ref
            self.residual_sq += float(residual @ residual)
            self.diff_sq += float(diff @ diff)
            self.ref_sq += float(ref @ ref)

    @property
    def share(self) -> float:
        """``||r - x|| / ||r||``: how much of the output is the residual (inf: r is 0)."""
        return math.sqrt(self.residual_sq / self.ref_sq) if self.ref_sq else math.inf

    @property
    def error(self) -> float:
        """``||c - r|| / ||r - x||``: the residual's relative error."""
        if not self.residual_sq:
            return 0.0 if not self.diff_sq else math.inf
        return math.sqrt(self.diff_sq / self.residual_sq)


def pairs(
    feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> list[tuple[str, str]]:
    """(output, input) pairs of float arrays of one shape: the candidates for a residual."""
    found = []
    for name, array in outputs.items():
        if not np.issubdtype(array.dtype, np.floating) or not array.size:
            continue
        found += [
            (name, source)
            for source, values in feed.items()
            if np.issubdtype(np.asarray(values).dtype, np.floating)
            and np.shape(values) == array.shape
        ]
    return found


class Residuals:
    """The residual accumulators of a check's outputs, the pairs found on its first batch."""

    def __init__(self) -> None:
        self.accumulators: dict[tuple[str, str], ResidualAccumulator] | None = None

    def add(
        self,
        feed: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray],
    ) -> None:
        if self.accumulators is None:
            found = pairs(feed, reference)
            self.accumulators = {pair: ResidualAccumulator(*pair) for pair in found}
        for (output, source), accumulator in self.accumulators.items():
            values = np.asarray(feed[source])
            shape = reference[output].shape
            got = candidate.get(output)
            # Else this batch's shapes differ, or the candidate is broken (compare says how).
            if values.shape == shape and got is not None and got.shape == shape:
                accumulator.add(reference[output], got, values)

    def annotated(self, report: NumericReport) -> NumericReport:
        """``report`` with each output that is an input plus a residual (its nearest such
        input, within ``RESIDUAL_SHARE``) told so: ``residual_of``, ``residual_share`` and
        ``residual_error``. An output equal to its input has no residual to measure."""
        nearest = _nearest(self.accumulators.values() if self.accumulators else ())
        outputs = []
        for out in report.outputs:
            accumulator = nearest.get(out.name)
            if accumulator is not None:
                out = dataclasses.replace(
                    out,
                    residual_of=accumulator.source,
                    residual_share=accumulator.share,
                    residual_error=accumulator.error,
                )
            outputs.append(out)
        return dataclasses.replace(report, outputs=tuple(outputs))


def _nearest(accumulators: Iterable[ResidualAccumulator]) -> dict[str, ResidualAccumulator]:
    """Per output, the accumulator of the input nearest it, where within ``RESIDUAL_SHARE``
    and not equal to it."""
    nearest: dict[str, ResidualAccumulator] = {}
    for accumulator in accumulators:
        if not 0 < accumulator.share <= RESIDUAL_SHARE:
            continue
        best = nearest.get(accumulator.output)
        if best is None or accumulator.share < best.share:
            nearest[accumulator.output] = accumulator
    return nearest
