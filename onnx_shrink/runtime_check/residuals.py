"""Outputs that carry an input through, and the error of what the model adds to it.

A watermark encoder, a denoiser or a refiner outputs its input plus a change. An output's
relative error is measured against the whole output, so the input's share hides the change's
error: RivaGAN's pruned encoder read 0.0198 while its residual (2.3% of the frame) was off
by 0.86, and 11% of the watermark's bits flipped. Where an output has an input's shape and
lies within ``RESIDUAL_SHARE`` of it, the check measures the residual's error too:
``||c - r|| / ||r - x||`` (candidate, reference, input), streamed as ``compare`` does.

A streaming model's cache is no such sum: flashvad's ``next_cache_k`` is ``cache_k`` moved
one frame along its time axis, plus one new frame. ``r - x`` is then a frame-to-frame
difference, and "what it adds to the input" a wrong reading of it; the copied frames, exact
under any pass, hide the new one's error as the input hid the residual. Where an output is
its input shifted (``Shift``: the same elements, a few positions along one axis, in every
batch), the check measures the error of the new positions instead.
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


MAX_SHIFT = 4
"""The most positions a cache may move by in one step to be told a shifted copy"""


@dataclasses.dataclass(frozen=True)
class Shift:
    """An output that is its input moved ``steps`` positions along ``axis`` (of ``length``):
    ``r[k] = x[k + steps]`` where both exist; the ``|steps|`` positions left are new (at the
    end for ``steps > 0``, at the start for ``steps < 0``)."""

    axis: int
    steps: int
    length: int

    def _part(self, start: int, stop: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(start, stop),)

    def holds(self, reference: np.ndarray, source: np.ndarray) -> bool:
        """Whether the copied positions of ``reference`` equal ``source``'s exactly."""
        kept = self.length - abs(self.steps)
        if self.steps > 0:
            return np.array_equal(
                reference[self._part(0, kept)], source[self._part(self.steps, None)]
            )
        return np.array_equal(reference[self._part(-self.steps, None)], source[self._part(0, kept)])

    def new(self, array: np.ndarray) -> np.ndarray:
        """The new positions of ``array`` (an output of this shape)."""
        if self.steps > 0:
            return array[self._part(self.length - self.steps, None)]
        return array[self._part(0, -self.steps)]

    def describe(self) -> str:
        """ "its last 1 of 16 positions along axis 2"."""
        end = "last" if self.steps > 0 else "first"
        return f"its {end} {abs(self.steps)} of {self.length} positions along axis {self.axis}"


def find_shift(reference: np.ndarray, source: np.ndarray) -> Shift | None:
    """The smallest ``Shift`` (batch axis 0 aside) that ``reference`` is of ``source``, where
    at most ``MAX_SHIFT`` positions and fewer than half of them are new; else None."""
    for axis in range(1, reference.ndim):
        length = reference.shape[axis]
        for size in range(1, min(MAX_SHIFT, (length - 1) // 2) + 1):
            for steps in (size, -size):
                shift = Shift(axis, steps, length)
                if shift.holds(reference, source):
                    return shift
    return None


_UNDECIDED = Shift(0, 0, 0)


class ResidualAccumulator:
    """``||r - x||^2``, ``||c - r||^2`` and ``||r||^2`` of one output against one input of
    its shape, over the elements finite in all three; ``add`` a batch at a time. Where the
    output is the input shifted in every batch (``shift``), ``||r||^2`` and ``||c - r||^2``
    of its new positions too."""

    def __init__(self, output: str, source: str) -> None:
        self.output = output
        self.source = source
        self.residual_sq = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self._shift: Shift | None = _UNDECIDED
        self.new_sq = 0.0
        self.new_diff_sq = 0.0

    @property
    def shift(self) -> Shift | None:
        """The shift every batch so far held to (None: none, or no batch yet)."""
        return None if self._shift is _UNDECIDED else self._shift

    def add(self, reference: np.ndarray, candidate: np.ndarray, source: np.ndarray) -> None:
        self._add_shifted(reference, candidate, source)
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

    def _add_shifted(
        self, reference: np.ndarray, candidate: np.ndarray, source: np.ndarray
    ) -> None:
        if self._shift is _UNDECIDED:
            self._shift = find_shift(reference, source)
        elif self._shift is not None and not self._shift.holds(reference, source):
            self._shift = None  # a copy in one batch only: a residual after all
        if self._shift is not None:
            new = self._shift.new(reference).astype(np.float64)
            diff = self._shift.new(candidate).astype(np.float64) - new
            finite = np.isfinite(new) & np.isfinite(diff)
            self.new_sq += float(np.square(new[finite]).sum())
            self.new_diff_sq += float(np.square(diff[finite]).sum())

    @property
    def share(self) -> float:
        """``||r - x|| / ||r||``: how much of the output is the residual (inf: r is 0); for
        a shift, the new positions' ``||r_new|| / ||r||``."""
        part = self.new_sq if self.shift is not None else self.residual_sq
        return math.sqrt(part / self.ref_sq) if self.ref_sq else math.inf

    @property
    def error(self) -> float:
        """``||c - r|| / ||r - x||``: the residual's relative error; for a shift, the new
        positions' ``||c_new - r_new|| / ||r_new||``."""
        if self.shift is not None:
            return _ratio(self.new_diff_sq, self.new_sq)
        return _ratio(self.diff_sq, self.residual_sq)


def _ratio(error_sq: float, norm_sq: float) -> float:
    if not norm_sq:
        return 0.0 if not error_sq else math.inf
    return math.sqrt(error_sq / norm_sq)


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
                shift = accumulator.shift
                out = dataclasses.replace(
                    out,
                    residual_of=accumulator.source,
                    residual_share=accumulator.share,
                    residual_error=accumulator.error,
                    residual_shift=shift.describe() if shift is not None else None,
                )
            outputs.append(out)
        return dataclasses.replace(report, outputs=tuple(outputs))


def _nearest(accumulators: Iterable[ResidualAccumulator]) -> dict[str, ResidualAccumulator]:
    """Per output, the accumulator of the input it is a shift of, else of the input nearest
    it, where within ``RESIDUAL_SHARE`` and not equal to it."""
    nearest: dict[str, ResidualAccumulator] = {}
    for accumulator in accumulators:
        shifted = accumulator.shift is not None
        if not 0 < accumulator.share <= (math.inf if shifted else RESIDUAL_SHARE):
            continue
        best = nearest.get(accumulator.output)
        if best is None or (shifted, -accumulator.share) > (best.shift is not None, -best.share):
            nearest[accumulator.output] = accumulator
    return nearest
