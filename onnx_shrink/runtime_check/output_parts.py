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

from onnx_shrink.runtime_check.compare import CHUNK_ELEMENTS
from onnx_shrink.runtime_check.numeric_report import NumericReport, OutputComparison

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


def small_part(ref_sq: np.ndarray, axis: int = 0) -> Part | None:
    """The leading or trailing run of slices whose every sum of squares (``ref_sq``, one per
    slice of ``axis``, each over as many elements) is ``SEPARATION`` squared times or more
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
    return Part(axis, start, stop, n, math.sqrt(ratio))


@dataclasses.dataclass(frozen=True)
class PartResult:
    """The small part of an output and its figures against the reference's."""

    part: Part
    share: float
    """its norm over the whole output's"""
    relative_error: float
    cosine: float
    max_abs_error: float

    @property
    def label(self) -> str:
        """ "its slices 4-21 of 22 along axis 1, 6.78e+03x smaller than the rest"."""
        return f"{self.part.describe()}, {self.part.separation:.3g}x smaller than the rest"


def part_axes(reference: np.ndarray) -> tuple[int, ...]:
    """The axes along which ``reference`` alone (one batch) has a small part: the only ones
    accumulated after it, where every axis of every output would cost a pass each."""
    sums: dict[int, np.ndarray] = {}
    for chunk in _chunks(reference):
        squares = _finite(chunk.astype(np.float64)) ** 2
        for axis in _axes(reference):
            sums[axis] = sums.get(axis, 0.0) + _per_slice(squares, axis)
    return tuple(axis for axis, per_slice in sums.items() if small_part(per_slice))


def _axes(array: np.ndarray) -> list[int]:
    """The axes whose slices may be parts: the batch axis 0 aside, and those too long."""
    return [axis for axis in range(1, array.ndim) if 2 <= array.shape[axis] <= MAX_SLICES]


def _chunks(array: np.ndarray) -> list[np.ndarray]:
    """``array`` in runs of samples (axis 0) of about ``CHUNK_ELEMENTS`` values at most (one
    sample at least): float64 copies of a whole batch of MiniLM's outputs took 170 MB."""
    per_sample = max(1, array[:1].size)
    step = max(1, CHUNK_ELEMENTS // per_sample)
    return [array[start : start + step] for start in range(0, array.shape[0], step)]


def _per_slice(array: np.ndarray, axis: int) -> np.ndarray:
    return array.sum(axis=tuple(a for a in range(array.ndim) if a != axis))


def _finite(array: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(array), array, 0.0)


class PartAccumulator:
    """Per axis of one output (``axes``), the sums per slice of the reference's squares, the
    error's, the candidate's and their products, and the largest absolute error; ``add`` a
    batch at a time (elements finite in both)."""

    def __init__(self, axes: tuple[int, ...]) -> None:
        self.axes = axes
        self.sums: dict[int, dict[str, np.ndarray]] = {}
        self.max_abs: dict[int, np.ndarray] = {}

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        for axis in self.axes:
            sums = self.sums.get(axis)
            if sums and sums["ref"].size != reference.shape[axis]:
                return  # another batch's length: the first one's slices stand
        for ref_chunk, cand_chunk in zip(_chunks(reference), _chunks(candidate), strict=True):
            self._add(ref_chunk.astype(np.float64), cand_chunk.astype(np.float64))

    def _add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        finite = np.isfinite(ref) & np.isfinite(cand)
        if not finite.all():
            ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        diff = cand - ref
        terms = {"ref": ref * ref, "diff": diff * diff, "cand": cand * cand, "dot": ref * cand}
        for axis in self.axes:
            sums = self.sums.setdefault(axis, {})
            for key, term in terms.items():
                sums[key] = sums.get(key, 0.0) + _per_slice(term, axis)
            others = tuple(a for a in range(ref.ndim) if a != axis)
            largest = np.abs(diff).max(axis=others)
            self.max_abs[axis] = np.maximum(self.max_abs.get(axis, largest), largest)

    def result(self) -> PartResult | None:
        """The small part of widest separation over the axes and its figures; None where
        no axis has one."""
        found = [small_part(sums["ref"], axis) for axis, sums in self.sums.items()]
        found = [part for part in found if part is not None]
        if not found:
            return None
        part = max(found, key=lambda p: p.separation)
        inside = slice(part.start, part.stop)
        ref, diff, cand, dot = (self.sums[part.axis][k][inside].sum() for k in SUM_KEYS)
        total = self.sums[part.axis]["ref"].sum()
        norms = math.sqrt(ref * cand)
        return PartResult(
            part,
            share=math.sqrt(ref / total),
            relative_error=math.sqrt(diff / ref),
            cosine=dot / norms if norms else 1.0,
            max_abs_error=float(self.max_abs[part.axis][inside].max()),
        )


SUM_KEYS = ("ref", "diff", "cand", "dot")


def axes_for(reference: np.ndarray) -> tuple[int, ...]:
    """The axes along which the output whose first batch is ``reference`` shows a part
    (``part_axes``); () where it shows none, or is no float array."""
    if reference.ndim < 2 or not np.issubdtype(reference.dtype, np.floating):
        return ()
    return part_axes(reference)


def annotate(out: OutputComparison, found: PartResult | None) -> OutputComparison:
    """``out`` with its small part's figures (``found``; as it is for None)."""
    if found is None:
        return out
    return dataclasses.replace(
        out,
        small_part=found.label,
        small_part_share=found.share,
        small_part_error=found.relative_error,
        small_part_cosine=found.cosine,
        small_part_max_abs_error=found.max_abs_error,
    )


class OutputParts:
    """The part accumulators of one candidate's float outputs: along the axes each output's
    first batch shows a part (``axes_for``), none for the others."""

    def __init__(self, axes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """``axes``: per output, those axes where known already (the sensitivity runs
        screen the float outputs once for all their copies); the others are left out.
        None: each output's first batch decides."""
        self.screened = axes is not None
        self.accumulators: dict[str, PartAccumulator | None] = {
            name: PartAccumulator(along) for name, along in (axes or {}).items() if along
        }

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        for name, ref in reference.items():
            self.add_output(name, ref, candidate.get(name))

    def add_output(self, name: str, reference: np.ndarray, candidate: np.ndarray | None) -> None:
        if name not in self.accumulators and not self.screened:
            axes = axes_for(reference)
            self.accumulators[name] = PartAccumulator(axes) if axes else None
        accumulator = self.accumulators.get(name)
        # Else the candidate is broken or reshaped: compare says how.
        if accumulator is not None and candidate is not None and candidate.shape == reference.shape:
            accumulator.add(reference, candidate)

    def annotate(self, out: OutputComparison) -> OutputComparison:
        """``out`` with its small part's figures, where it has one (``annotate``)."""
        accumulator = self.accumulators.get(out.name)
        return annotate(out, accumulator.result() if accumulator is not None else None)

    def annotated(self, report: NumericReport) -> NumericReport:
        """``report`` with each output that joins parts of different scales told so:
        ``small_part``, ``small_part_share``, ``small_part_error``."""
        outputs = tuple(self.annotate(out) for out in report.outputs)
        return dataclasses.replace(report, outputs=outputs)
