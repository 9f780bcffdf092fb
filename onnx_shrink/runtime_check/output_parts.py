"""Outputs that join parts of very different scales, and the error of the small part.

A YOLOv8 detector's single output holds, along one axis, 4 rows of box coordinates (RMS
about 100 pixels) and a row of class scores per class (RMS under 0.02). An output's relative
error is measured against its whole norm, so the boxes' share hides the scores' error: the
int8 NudeNet detector read 0.033 over the output, where its score rows were off by 0.43 (7.3
dB SNR). Where an output's slices along one axis split into a leading and a trailing part
whose every slice's RMS is ``SEPARATION`` times or more apart, the check measures the small
part's error too, streamed as ``compare`` does: the sums of squares per slice, over all
batches, decide the split at the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from onnx_shrink.runtime_check.numeric_report import NumericReport

SEPARATION = 100.0
"""The least ratio of RMS between every slice of the large part and every slice of the
small one: boxes in pixels beside probabilities are 4 orders apart; channels of one feature
map, a few."""

MAX_SLICES = 1024
"""Axes longer than this are positions (anchors, pixels, frames), not a layout of parts"""


@dataclasses.dataclass(frozen=True)
class Part:
    """Slices ``start`` to ``stop`` (exclusive) of ``length`` along ``axis``, and how many
    times smaller their largest RMS is than the rest's smallest (``separation``)."""

    axis: int
    start: int
    stop: int
    length: int
    separation: float

    def describe(self) -> str:
        """ "its slices 4-21 of 22 along axis 1"."""
        span = f"{self.start}" if self.stop - self.start == 1 else f"{self.start}-{self.stop - 1}"
        return f"its slices {span} of {self.length} along axis {self.axis}"


def small_part(ref_sq: np.ndarray) -> Part | None:
    """The leading or trailing run of slices whose every sum of squares (``ref_sq``, one per
    slice of one axis, each over as many elements) is ``SEPARATION`` squared times or more
    under every other slice's, the split of widest separation; None where no split has it
    or the small part is all zero (there is no error of it to measure)."""
    n = ref_sq.size
    if n < 2:
        return None
    head_min = np.minimum.accumulate(ref_sq)[:-1]  # the first k slices, k = 1..n-1
    head_max = np.maximum.accumulate(ref_sq)[:-1]
    tail_min = np.minimum.accumulate(ref_sq[::-1])[::-1][1:]  # slices k..n-1
    tail_max = np.maximum.accumulate(ref_sq[::-1])[::-1][1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        small_tail = np.where(tail_max > 0, head_min / tail_max, 0.0)
        small_head = np.where(head_max > 0, tail_min / head_max, 0.0)
    best = None
    for ratios, tail in ((small_tail, True), (small_head, False)):
        k = int(np.argmax(ratios))
        ratio = float(ratios[k])
        if ratio >= SEPARATION**2 and (best is None or ratio > best[0]):
            best = (ratio, k + 1, tail)
    if best is None:
        return None
    ratio, k, tail = best
    start, stop = (k, n) if tail else (0, k)
    return Part(0, start, stop, n, math.sqrt(ratio))


class PartAccumulator:
    """Per axis of one output (the batch axis 0 aside, and axes longer than ``MAX_SLICES``),
    the sums of squares of the reference and of the error per slice; ``add`` a batch at a
    time (elements finite in both)."""

    def __init__(self) -> None:
        self.ref_sq: dict[int, np.ndarray] = {}
        self.diff_sq: dict[int, np.ndarray] = {}

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.astype(np.float64)
        diff = candidate.astype(np.float64) - ref
        finite = np.isfinite(ref) & np.isfinite(diff)
        if not finite.all():
            ref, diff = np.where(finite, ref, 0.0), np.where(finite, diff, 0.0)
        ref, diff = np.square(ref), np.square(diff)
        for axis in range(1, ref.ndim):
            if not 2 <= ref.shape[axis] <= MAX_SLICES:
                continue
            others = tuple(a for a in range(ref.ndim) if a != axis)
            if axis in self.ref_sq and self.ref_sq[axis].size != ref.shape[axis]:
                continue  # another batch's length: the first one's axes stand
            self.ref_sq[axis] = self.ref_sq.get(axis, 0.0) + ref.sum(axis=others)
            self.diff_sq[axis] = self.diff_sq.get(axis, 0.0) + diff.sum(axis=others)

    def result(self) -> tuple[Part, float, float] | None:
        """The small part of widest separation over the axes, its share of the output's
        norm and its relative error; None where no axis has one."""
        found = []
        for axis, ref_sq in self.ref_sq.items():
            part = small_part(ref_sq)
            if part is not None:
                found.append(dataclasses.replace(part, axis=axis))
        if not found:
            return None
        part = max(found, key=lambda p: p.separation)
        ref_sq, diff_sq = self.ref_sq[part.axis], self.diff_sq[part.axis]
        inside = slice(part.start, part.stop)
        share = math.sqrt(ref_sq[inside].sum() / ref_sq.sum())
        error = math.sqrt(diff_sq[inside].sum() / ref_sq[inside].sum())
        return part, share, error


class OutputParts:
    """The part accumulators of a check's float outputs."""

    def __init__(self) -> None:
        self.accumulators: dict[str, PartAccumulator] = {}

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        for name, ref in reference.items():
            got = candidate.get(name)
            # Else the candidate is broken or reshaped: compare says how.
            if ref.ndim < 2 or not np.issubdtype(ref.dtype, np.floating):
                continue
            if got is None or got.shape != ref.shape:
                continue
            self.accumulators.setdefault(name, PartAccumulator()).add(ref, got)

    def annotated(self, report: NumericReport) -> NumericReport:
        """``report`` with each output that joins parts of different scales told so:
        ``small_part``, ``small_part_share``, ``small_part_error``."""
        outputs = []
        for out in report.outputs:
            accumulator = self.accumulators.get(out.name)
            found = accumulator.result() if accumulator is not None else None
            if found is not None:
                part, share, error = found
                out = dataclasses.replace(
                    out,
                    small_part=f"{part.describe()}, {part.separation:.3g}x smaller than the rest",
                    small_part_share=share,
                    small_part_error=error,
                )
            outputs.append(out)
        return dataclasses.replace(report, outputs=tuple(outputs))
