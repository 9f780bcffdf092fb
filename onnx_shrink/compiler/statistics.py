"""What data-aware passes ask for and receive: streaming tensor statistics as plain data.

A data-aware pass returns ``StatRequest``s from ``requests(model)``; the pipeline has
``runtime_check.collect`` run the current model over the calibration data and hands back a
``Statistics`` holding one result per request. Nothing here runs a model, so passes can be
tested with hand-made statistics.

Every result is exact whatever the batching: min/max and counts are exact, histograms use
fixed edges decided from a fixed prefix of the samples (extended by bins of the same width when
later values pass them) and lattices fixed by each sample's place in the data, and sums
accumulate in float64.
Non-finite values (the -inf of an additive attention mask) are counted, never folded into a
range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

StatKind = Literal["minmax", "histogram", "channel_absmax", "channel_sqnorm", "channel_sum", "gram"]


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """One statistic of one tensor.

    kinds:
        minmax: finite min and max over all elements, and the count of non-finite ones.
        histogram: counts over equal bins (about ``bins`` of them) covering the tensor's
            finite [min, max]. With ``per_sample`` > 0, a tensor holding more elements than
            that per sample is counted on a lattice of them: every ``stride``-th element of
            the samples' flattened tensors laid end to end (``stride`` a prime, chosen from
            the first sample's size), so each sample's lattice starts elsewhere. The lattice
            is the same whatever the batching, so the counts still are; min/max stay exact.
            Counting every element costs ~2 ns each in numpy, more than inference. With
            ``later_per_sample`` > 0, the samples after the first ones (those that fix the
            edges, ``runtime_check.collect``) are counted on a sparser lattice of about that
            many elements (never denser; none with ``per_sample`` 0), each weighing (its
            stride / the first lattice's): every sample still weighs the same, and many
            samples cost little more than few.
        channel_absmax: max |x| per index of ``axis`` (negative axes count from the end).
        channel_sqnorm: sum of x^2 per index of ``axis`` and the number of rows summed.
        channel_sum: sum of x per index of ``axis`` and the number of rows summed (a mean).
        gram: X^T X of the tensor flattened to rows of ``axis`` (its channels), the column
            sums and the row count. With ``patch`` (a 2-D Conv's kernel, strides, dilations
            and pads: ``kh, kw, sh, sw, dh, dw, top, left, bottom, right``) the rows are the
            im2col patches that Conv reads from an NCHW tensor, columns ordered (C, kh, kw).
    """

    tensor: str
    kind: StatKind
    axis: int = -1
    bins: int = 2048
    patch: tuple[int, ...] = ()
    per_sample: int = 0
    later_per_sample: int = 0

    def __post_init__(self) -> None:
        if self.kind == "histogram" and not 1 <= self.bins <= HistogramAccumulator.MAX_BINS:
            raise ValueError(
                f"{self.tensor}: histograms have 1 to {HistogramAccumulator.MAX_BINS} bins, "
                f"not {self.bins}"
            )


@dataclasses.dataclass(frozen=True)
class MinMax:
    minimum: float
    maximum: float
    nonfinite: int
    elements: int


@dataclasses.dataclass(frozen=True)
class Histogram:
    """``counts[i]`` counted elements fell in ``[edges[i], edges[i + 1])`` (a value on an edge
    is a tie, rounded to the even bin index); every ``stride``-th element of each of the first
    samples was counted, and of later ones a sparser lattice's, each of its elements weighing
    more (float64 counts, see ``StatRequest``)."""

    edges: np.ndarray
    counts: np.ndarray
    stride: int = 1

    @property
    def total(self) -> int:
        return int(round(float(self.counts.sum())))


@dataclasses.dataclass(frozen=True)
class ChannelValues:
    """Per-channel results (absmax or sum of squares) and the rows they cover."""

    values: np.ndarray
    rows: int


@dataclasses.dataclass(frozen=True)
class Gram:
    """``matrix = X^T X`` and ``sums = X^T 1`` over ``rows`` rows: with them, the Gram of
    ``[X, 1]`` (a layer with a bias) is known too."""

    matrix: np.ndarray
    rows: int
    sums: np.ndarray | None = None


StatResult = MinMax | Histogram | ChannelValues | Gram


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Results by request, the number of samples they were computed over, and the data."""

    results: Mapping[StatRequest, StatResult]
    samples: int
    source: str
    probe_errors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """by ``Probe.key``: the relative squared error of the model's outputs with that probe's
    edit alone (``DataAwarePass.probes``); empty when the pass asked for none"""

    def get(self, tensor: str, kind: StatKind, **key: int) -> StatResult | None:
        for request, result in self.results.items():
            if (
                request.tensor == tensor
                and request.kind == kind
                and all(getattr(request, k) == v for k, v in key.items())
            ):
                return result
        return None

    def minmax(self, tensor: str) -> MinMax | None:
        result = self.get(tensor, "minmax")
        return result if isinstance(result, MinMax) else None

    def histogram(self, tensor: str) -> Histogram | None:
        result = self.get(tensor, "histogram")
        return result if isinstance(result, Histogram) else None


# ---- streaming accumulators (used by runtime_check.collect; pure numpy, so testable here) ----


class MinMaxAccumulator:
    """Finite min/max and non-finite count, merged batch by batch."""

    def __init__(self) -> None:
        self.minimum = np.inf
        self.maximum = -np.inf
        self.nonfinite = 0
        self.elements = 0

    @property
    def finite(self) -> bool:
        """No inf/NaN reached the reductions (always true after a careful pass)."""
        return bool(np.isfinite(self.minimum) and np.isfinite(self.maximum)) or self.elements == 0

    def add_reduced(self, minimum: float, maximum: float, nonfinite: int, elements: int) -> None:
        """Merge a batch already reduced (inside the graph) to its finite min/max."""
        # NaN must stick (min() would drop it), so that a fast pass flags the tensor.
        minimum, maximum = float(minimum), float(maximum)
        self.minimum = minimum if np.isnan(minimum) else min(self.minimum, minimum)
        self.maximum = maximum if np.isnan(maximum) else max(self.maximum, maximum)
        self.nonfinite += int(nonfinite)
        self.elements += int(elements)

    def add(self, array: np.ndarray) -> None:
        finite = array[np.isfinite(array)]
        if finite.size:
            self.add_reduced(finite.min(), finite.max(), array.size - finite.size, array.size)
        else:
            self.add_reduced(np.inf, -np.inf, array.size, array.size)

    def result(self) -> MinMax:
        if self.minimum > self.maximum:  # no finite value at all
            return MinMax(0.0, 0.0, self.nonfinite, self.elements)
        return MinMax(self.minimum, self.maximum, self.nonfinite, self.elements)


class HistogramAccumulator:
    """Counts over fixed, equal bins; additive, so independent of how samples are batched.

    Values past the edges are not clipped into the end bins: they are counted in bins of the
    same width beyond them, and ``result`` extends the edges to cover them, so the histogram
    stays exact over the tensor's whole range. Only when that would take more than
    ``MAX_EXTENSION`` times the bins (``fits`` is False) must the caller count again over
    wider edges.
    """

    MAX_EXTENSION = 4
    # Bin indices are int16 (the graph computes them with one QuantizeLinear), saturated at
    # its limits; a saturated index must read as "too far" (``fits`` False), which holds
    # while MAX_EXTENSION x bins < 2**15.
    INDEX_TYPE = np.int16
    MAX_BINS = 8000

    def __init__(self, minimum: float, maximum: float, bins: int, stride: int = 1) -> None:
        if not 1 <= bins <= self.MAX_BINS:
            raise ValueError(f"histograms have 1 to {self.MAX_BINS} bins, not {bins}")
        # Edges stay inside float32 (the bin arithmetic runs in float32) and span at least a
        # width float32 can hold, whatever the data (subnormals, masks).
        limit = float(np.finfo(np.float32).max) / 4
        # Past the limit no extension can follow: those values go into the end bins.
        self._open_low, self._open_high = minimum >= -limit, maximum <= limit
        minimum = float(np.clip(minimum, -limit, limit))
        maximum = float(np.clip(maximum, -limit, limit))
        if maximum - minimum < 1e-30:
            maximum = minimum + max(abs(minimum) * 1e-6, 1e-30)
        self.edges = np.linspace(minimum, maximum, bins + 1, dtype=np.float64)
        self.bins = bins
        # Integer counts per weight, weighed only in ``result``: sums of floats would depend
        # on how the samples were grouped into runs.
        self._counts: dict[float, np.ndarray] = {}
        self._outside: dict[float, dict[int, int]] = {}
        self.stride = stride
        self.nonfinite = 0  # inf/NaN values left out (of the lattice values seen)

    @classmethod
    def covering(cls, minimum: float, maximum: float, bins: int, stride: int = 1):
        """An accumulator whose bins hold every value of [minimum, maximum]: its edges reach
        1/64 of a bin past both ends (see ``widened``), so neither end is a rounding tie."""
        margin = max(maximum - minimum, 0.0) / (64 * bins)
        return cls(*widened(minimum, maximum, margin, bins), bins, stride)

    def index_constants(self) -> tuple[np.float32, np.float32]:
        """(centre of the first bin, bin width) in float32: bin = saturate_int16(round_even(
        (x - centre) / width)), onnxruntime's QuantizeLinear of ``x - centre``. The same
        arithmetic runs in numpy here and in the graph (collect), so a value lands in the same
        bin however it was batched or computed."""
        width = (self.edges[-1] - self.edges[0]) / self.bins
        return np.float32(self.edges[0] + width / 2), np.float32(width)

    def add(self, array: np.ndarray) -> None:
        """Count one tensor's finite values, every ``stride``-th from its first: the lattice of
        the first sample (``collect`` shifts the later samples')."""
        self.add_values(np.asarray(array).ravel()[:: self.stride])

    def add_values(self, values: np.ndarray, weight: float = 1.0) -> None:
        """Count values already on the lattice (finite ones only), each as ``weight``."""
        values = np.asarray(values, dtype=np.float32).ravel()
        # min/max meet any inf or NaN (NaN propagates): no mask unless one is there.
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            finite = np.isfinite(values)
            self.nonfinite += int(values.size - finite.sum())
            values = values[finite]
        self.add_indices(self.bin_indices(values), weight)

    def bin_indices(self, values: np.ndarray) -> np.ndarray:
        """The bin index of each float32 value (see ``index_constants``), as int16."""
        centre, width = self.index_constants()
        info = np.iinfo(self.INDEX_TYPE)
        # Values near float32's limits overflow to inf here, which the saturation bounds, as
        # the graph's arithmetic does: the overflow is the intended result.
        with np.errstate(over="ignore", invalid="ignore"):
            # In place after the first step: the probe's values (collect) pass through here,
            # millions a histogram, and each temporary costs a pass over them.
            position = np.subtract(np.asarray(values, np.float32), centre)
            np.divide(position, width, out=position)
            np.rint(position, out=position)
            if not position.size:
                return position.astype(self.INDEX_TYPE)
            # min/max propagate NaN: two reductions tell whether the rare fixes are needed.
            low, high = position.min(), position.max()
            if np.isnan(low):  # NaN saturates low, as onnxruntime's QuantizeLinear gives it
                position[np.isnan(position)] = info.min
                low, high = position.min(), position.max()
            if low < info.min or high > info.max:
                np.clip(position, info.min, info.max, out=position)
            return position.astype(self.INDEX_TYPE)

    def add_indices(self, indices: np.ndarray, weight: float = 1.0) -> None:
        """Count precomputed bin indices (already on the lattice), each as ``weight``
        elements; those outside [0, bins) are kept for the extension."""
        indices = indices.ravel()
        bins = self.bins
        # Called per run and request (collect's hot loop): a weight's counts are made once.
        counted = self._counts.get(weight)
        if counted is None:
            counted = self._counts[weight] = np.zeros(bins, dtype=np.int64)
        if not self._open_high:
            indices = np.minimum(indices, bins - 1)
        if not self._open_low:
            indices = np.maximum(indices, 0)
        # Two reductions find the usual case, every index inside, without a mask's passes.
        if not indices.size or (indices.min() >= 0 and indices.max() < bins):
            counted += np.bincount(indices, minlength=bins)
            return
        inside = (indices >= 0) & (indices < bins)
        counted += np.bincount(indices[inside], minlength=bins)
        beyond, counts = np.unique(indices[~inside], return_counts=True)
        outside = self._outside.setdefault(weight, {})
        for index, count in zip(beyond.tolist(), counts.tolist(), strict=True):
            outside[index] = outside.get(index, 0) + count

    @property
    def counts(self) -> np.ndarray:
        """The weighed counts inside the edges (float64)."""
        total = np.zeros(self.bins, dtype=np.float64)
        for weight in sorted(self._counts):
            total += weight * self._counts[weight]
        return total

    @property
    def outside(self) -> dict[int, float]:
        """The weighed counts of bins past the edges, by bin index."""
        total: dict[int, float] = {}
        for weight in sorted(self._outside):
            for index, count in self._outside[weight].items():
                total[index] = total.get(index, 0.0) + weight * count
        return total

    def _extent(self, outside: dict[int, float]) -> tuple[int, int]:
        return min(0, *outside), max(self.bins - 1, *outside)

    @property
    def fits(self) -> bool:
        """Can ``result`` cover every counted value within ``MAX_EXTENSION`` x the bins?"""
        if not self._outside:
            return True
        first, last = self._extent(self.outside)
        return last - first + 1 <= self.MAX_EXTENSION * self.bins

    def result(self) -> Histogram:
        """The counts over the edges, extended by equal bins to cover every counted value.

        Raises:
            ValueError: not ``fits``.
        """
        if not self._outside:
            return Histogram(self.edges, self.counts, self.stride)
        if not self.fits:
            raise ValueError("values fell too far beyond the histogram's edges; count again")
        outside = self.outside
        first, last = self._extent(outside)
        counts = np.zeros(last - first + 1, dtype=np.float64)
        counts[-first : -first + self.bins] = self.counts
        for index, count in outside.items():
            counts[index - first] += count
        width = (self.edges[-1] - self.edges[0]) / self.bins
        edges = self.edges[0] + width * np.arange(first, last + 2, dtype=np.float64)
        return Histogram(edges, counts, self.stride)


def widened(minimum: float, maximum: float, margin: float, bins: int) -> tuple[float, float]:
    """[minimum, maximum] widened by ``margin`` on each side, as histogram edges with ``bins``.

    Never across zero: a one-sided range (after ReLU) stays one-sided. Zero itself is an edge
    then, a rounding tie of the bin arithmetic (``index_constants``): as the low edge it rounds
    into the first bin, but as the top edge past the last (even index), so a maximum of 0
    rises 1/64 of a bin instead.
    """
    low = minimum - margin if minimum < 0 else max(0.0, minimum - margin)
    if maximum > 0:
        high = maximum + margin
    elif maximum < 0:
        high = min(0.0, maximum + margin)
    else:
        high = max(maximum - low, 1e-30) / (64 * bins)
    return low, high


class ChannelAccumulator:
    """Per-channel max |x|, sum of x^2 or sum of x along ``axis`` (non-finite values count
    as 0)."""

    def __init__(
        self, kind: Literal["channel_absmax", "channel_sqnorm", "channel_sum"], axis: int
    ) -> None:
        self.kind = kind
        self.axis = axis
        self.values: np.ndarray | None = None
        self.rows = 0

    def add(self, array: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(array, dtype=np.float64), self.axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        flat = np.where(np.isfinite(flat), flat, 0.0)
        if self.kind == "channel_absmax":
            part = np.abs(flat).max(axis=0)
        else:
            part = (flat**2 if self.kind == "channel_sqnorm" else flat).sum(0)
        if self.values is None:
            self.values = part
        elif self.kind == "channel_absmax":
            self.values = np.maximum(self.values, part)
        else:
            self.values = self.values + part
        self.rows += flat.shape[0]

    def result(self) -> ChannelValues:
        return ChannelValues(self.values if self.values is not None else np.zeros(0), self.rows)


class GramAccumulator:
    """X^T X and X^T 1 over rows of ``axis`` (every other axis is a row index), or over a
    Conv's im2col patches (``patch``, see ``StatRequest``), in float64."""

    def __init__(self, axis: int = -1, patch: tuple[int, ...] = ()) -> None:
        self.axis = axis
        self.patch = patch
        self.matrix: np.ndarray | None = None
        self.sums: np.ndarray | None = None
        self.rows = 0

    def add(self, array: np.ndarray) -> None:
        if self.patch:
            for rows in im2col_rows(np.asarray(array), self.patch):
                self._add_rows(rows)
            return
        moved = np.moveaxis(np.asarray(array, dtype=np.float64), self.axis, -1)
        self._add_rows(moved.reshape(-1, moved.shape[-1]))

    def _add_rows(self, flat: np.ndarray) -> None:
        flat = np.where(np.isfinite(flat), flat.astype(np.float64), 0.0)
        part, sums = flat.T @ flat, flat.sum(axis=0)
        if self.matrix is None:
            self.matrix, self.sums = part, sums
        else:  # in place: a 4096-wide input's Gram is 128 MiB, and a sum would be a third
            self.matrix += part
            self.sums += sums
        self.rows += flat.shape[0]

    def result(self) -> Gram:
        if self.matrix is None:
            return Gram(np.zeros((0, 0)), 0, np.zeros(0))
        return Gram(self.matrix, self.rows, self.sums)


_PATCH_ROWS_BYTES = 1 << 26  # im2col rows are made 64 MiB at a time


def im2col_rows(x: np.ndarray, patch: tuple[int, ...]):
    """Yield ``[rows, C * kh * kw]`` blocks of the patches a 2-D Conv reads from ``x`` (NCHW),
    a band of output rows at a time (so rows of several samples interleave: a Gram does not
    care about their order)."""
    kh, kw, sh, sw, dh, dw, top, left, bottom, right = patch
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = padded.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    per_row = n * out_w * c * kh * kw * 8
    step = max(1, _PATCH_ROWS_BYTES // max(per_row, 1))
    for start in range(0, out_h, step):
        stop = min(out_h, start + step)
        parts = [
            padded[
                :,
                :,
                i * dh + start * sh : i * dh + (stop - 1) * sh + 1 : sh,
                j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
            ]  # fmt: skip
            for i in range(kh)
            for j in range(kw)
        ]  # each [n, c, rows, out_w]
        stacked = np.stack(parts, axis=2)  # [n, c, kh*kw, rows, out_w]
        yield np.moveaxis(stacked, (1, 2), (3, 4)).reshape(-1, c * kh * kw)
