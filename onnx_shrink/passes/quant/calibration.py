"""Activation ranges for static quantization, chosen from calibration statistics.

``tensor_range`` turns one tensor's ``MinMax`` and signed ``Histogram`` into [lo, hi] with
lo <= 0 <= hi, clamped to the observed finite range. Histograms are read as uniform inside
each bin, so the signed CDF ``F(x) = P(X <= x)`` is piecewise linear through the edges.
Non-finite values are already excluded from both statistics and play no part here.

* minmax: ``[min(x_min, 0), max(x_max, 0)]``.
* percentile: |x| mode (symmetric, or one-sided data) solves ``F(t) - F(-t) = p/100`` and
  returns ``[-t, t]``; two-sided asymmetric solves ``F(lo) = (1 - p/100) / 2`` and
  ``F(hi) = 1 - (1 - p/100) / 2`` (the same clipped mass as the |x| mode, split evenly).
* entropy: TensorRT's KL calibration on a histogram ``h`` of |x| (bins about as wide as the
  signed ones), returning ``[-t, t]`` (also for two-sided asymmetric data). Candidate ``i``
  (threshold ``t = i * width``, ``i = nq .. n``): ``P = h[:i]`` with the mass beyond folded
  into ``P[i-1]``; ``Q = h[:i]`` summed into ``nq`` groups of ``i // nq`` bins (the last takes
  the rest) and spread evenly over the bins where ``P != 0``, empty groups smoothed to 1e-4
  counts; the threshold minimizes ``KL(P || Q) = sum P log(P / Q)`` (both normalized).
  ``nq = levels // 2 + 1`` (128 for 8 bits), or ``levels + 1`` for one-sided asymmetric data
  (all >= 0 or all <= 0: lo = 0 or hi = 0, all levels on one side). A histogram with fewer
  than ``8 * nq`` |x| bins is first resampled to that many, density linear inside each bin, so
  candidates always start below the max (onnxruntime's 128-bin default never does). That is
  an approximation: a resampled tail is smooth, which lowers the divergence of wide
  thresholds (one-sided u8 data with a few far outliers kept its full range below about 240
  bins), so ``quant`` counts entropy's histograms with at least ``ENTROPY_MIN_BINS``. A point
  mass at 0 (ReLU's zeros: the first bin's excess over ``h1^2 / h2``) is exact at every
  threshold and is left out of P and Q, else it would dominate the divergence. 16-bit types
  (``nq > 512``) keep the full range: their grid is finer than any histogram. A histogram of
  fewer than ``64 * nq`` values is too sparse for the divergence (``too_sparse_for_entropy``):
  ``quant`` gives such a tensor mse's range instead.
* mse: minimizes the expected squared error with step ``s``:
  ``E(lo, hi) = (F(hi) - F(lo)) * s^2 / 12 + sum_{x < lo} (lo - x)^2 + sum_{x > hi} (x - hi)^2``
  with ``s = (hi - lo) / levels`` (asymmetric, 2-D grid over lo and hi) or
  ``s = t / ((levels - 1) / 2)`` and ``[lo, hi] = [-t, t]`` (symmetric, 1-D grid over t),
  on 129-point grids, each round narrowed to one step either side of its best (3 rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np

from onnx_shrink.compiler.statistics import Histogram, MinMax
from onnx_shrink.passes.quant.numerics import QuantType

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = get_args(Method)

_KL_EPSILON = 1e-4  # counts given to an empty quantized group (TensorRT's smoothing)
_KL_MAX_QUANTIZED_BINS = 512  # beyond this (16-bit types) entropy keeps the full range
_KL_BINS_PER_QUANTIZED_BIN = 8  # histograms coarser than this are resampled
# The bins an 8-bit entropy calibration should count: 8 per level of one-sided u8 (nq 256).
ENTROPY_MIN_BINS = _KL_BINS_PER_QUANTIZED_BIN * 256
_GRID_POINTS = 129
_GRID_ROUNDS = 3


def tensor_range(
    method: Method,
    minmax: MinMax,
    histogram: Histogram | None,
    qtype: QuantType,
    *,
    symmetric: bool,
    percentile: float = 99.999,
) -> tuple[float, float]:
    """The range [lo, hi] (lo <= 0 <= hi, finite) to quantize one tensor with."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not (np.isfinite(minmax.minimum) and np.isfinite(minmax.maximum)):
        raise ValueError(f"non-finite range [{minmax.minimum}, {minmax.maximum}]")
    lo_obs, hi_obs = _observed(minmax)
    if method != "minmax" and histogram is None:
        raise ValueError(f"calibration method {method!r} needs a histogram")
    if method == "minmax" or lo_obs == hi_obs:
        return lo_obs, hi_obs
    edges = np.asarray(histogram.edges, dtype=np.float64)
    counts = np.asarray(histogram.counts, dtype=np.float64)
    if counts.size == 0 or edges.size != counts.size + 1 or not counts.sum() > 0:
        return lo_obs, hi_obs
    one_sided = _one_sided(lo_obs, hi_obs, symmetric)
    if method == "percentile":
        lo, hi = _percentile_range(edges, counts, percentile, symmetric or one_sided)
    elif method == "entropy":
        t = _entropy_threshold(edges, counts, _quantized_bins(qtype, one_sided))
        lo, hi = -t, t
    else:
        lo, hi = _mse_range(edges, counts, qtype, symmetric, lo_obs, hi_obs)
    lo, hi = min(max(lo, lo_obs), 0.0), max(min(hi, hi_obs), 0.0)
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else (lo_obs, hi_obs)


def _observed(minmax: MinMax) -> tuple[float, float]:
    """The observed range widened to hold 0."""
    return min(float(minmax.minimum), 0.0), max(float(minmax.maximum), 0.0)


def _one_sided(lo_obs: float, hi_obs: float, symmetric: bool) -> bool:
    """Asymmetric data all >= 0 or all <= 0: every level on one side."""
    return not symmetric and (lo_obs == 0.0 or hi_obs == 0.0)


def _quantized_bins(qtype: QuantType, one_sided: bool) -> int:
    """Entropy's ``nq``: the levels on the |x| side of the grid."""
    return qtype.levels + 1 if one_sided else qtype.levels // 2 + 1


ENTROPY_MIN_VALUES_PER_LEVEL = 64
"""Values a histogram must have counted per |x| level (``nq``) for entropy to choose from it"""


def too_sparse_for_entropy(
    minmax: MinMax, histogram: Histogram, qtype: QuantType, *, symmetric: bool
) -> bool:
    """Whether ``histogram`` counted fewer than ``ENTROPY_MIN_VALUES_PER_LEVEL`` values per
    level of |x|, too few for the KL divergence to mean anything: with most of P's bins
    empty, the divergence is lowest at thresholds that clip much of the data. A squeeze-and-
    excitation block's [N, C, 1, 1] tensors hold C values a sample: PP-LCNet's text-orientation
    classifier's 8 and 32 (128 and 512 at 16 samples) lost their tails under entropy, and its
    top-1 fell to 5/8; PP-OCRv6's tiny detector found no text at all. On draws from a Laplace,
    a Gaussian or a ReLU'd Gaussian, entropy's range quantized fresh draws 1.0 to 8.4 times
    worse (squared error, median of 10-20 draws) than mse's at 128-8192 values, and 0.93 to
    1.8 times at 16384-65536 (u8, 2048 bins)."""
    levels = _quantized_bins(qtype, _one_sided(*_observed(minmax), symmetric))
    counted = histogram.total / max(histogram.stride, 1)
    return counted < ENTROPY_MIN_VALUES_PER_LEVEL * levels


# ---- percentile ----


def _cdf(edges: np.ndarray, counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Counts at or below ``x``, linear inside bins: ``F(x)`` unnormalized."""
    return np.interp(x, edges, np.concatenate(([0.0], np.cumsum(counts))))


def _invert(x: np.ndarray, cdf: np.ndarray, target: float, *, upper: bool) -> float:
    """The ``x`` where the piecewise-linear ``cdf`` reaches ``target``.

    On a flat stretch, the highest such ``x`` if ``upper`` else the lowest.
    """
    index = int(np.searchsorted(cdf, target, side="left" if upper else "right"))
    index = min(max(index, 1), x.size - 1)
    c0, c1 = cdf[index - 1], cdf[index]
    fraction = min(max((target - c0) / (c1 - c0), 0.0), 1.0) if c1 > c0 else float(upper)
    return float(x[index - 1] + fraction * (x[index] - x[index - 1]))


def _percentile_range(
    edges: np.ndarray, counts: np.ndarray, percentile: float, absolute: bool
) -> tuple[float, float]:
    total = counts.sum()
    if absolute:
        # G(t) = F(t) - F(-t) is linear between the |edges|, so invert it exactly there.
        t = np.unique(np.concatenate(([0.0], np.abs(edges))))
        mass = _cdf(edges, counts, t) - _cdf(edges, counts, -t)
        threshold = _invert(t, mass, percentile / 100.0 * total, upper=True)
        return -threshold, threshold
    cdf = np.concatenate(([0.0], np.cumsum(counts)))
    tail = (100.0 - percentile) / 200.0 * total
    return _invert(edges, cdf, tail, upper=False), _invert(edges, cdf, total - tail, upper=True)


# ---- entropy ----


def _abs_histogram(edges: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Counts of |x| in equal bins over [0, max |x|] about as wide as the signed ones."""
    amax = max(abs(edges[0]), abs(edges[-1]))
    width = float(np.min(np.diff(edges)))
    bins = int(np.clip(amax / width if width > 0 else np.inf, 1, counts.size))
    t = np.linspace(0.0, amax, bins + 1)
    mass = _cdf(edges, counts, t) - _cdf(edges, counts, -t)
    return np.maximum(np.diff(mass), 0.0), amax / bins


def _resample(counts: np.ndarray, factor: int) -> np.ndarray:
    """Split each bin in ``factor``, density linear between bin centres, masses kept."""
    centres = np.arange(counts.size) + 0.5
    fine = (np.arange(counts.size * factor) + 0.5) / factor
    density = np.interp(fine, centres, counts).reshape(counts.size, factor)
    sums = density.sum(axis=1, keepdims=True)
    return (density * (counts[:, None] / np.where(sums > 0, sums, 1.0))).ravel()


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _kl_divergences(h: np.ndarray, quantized_bins: int) -> np.ndarray:
    """``KL(P_i || Q_i)`` for every candidate ``i = quantized_bins .. h.size`` at once.

    Within group ``j`` Q is constant, ``q_j = S_j / Z_j`` (sum and nonzero count of P's bins),
    so ``sum P log Q = sum_j P_j log q_j`` and prefix sums give every candidate in O(nq).
    """
    candidates = np.arange(quantized_bins, h.size + 1)
    merged = candidates // quantized_bins
    cum = np.concatenate(([0.0], np.cumsum(h)))
    nonzero = np.concatenate(([0], np.cumsum(h > 0)))
    cum_xlogx = np.concatenate(([0.0], np.cumsum(_xlogx(h))))
    starts = merged[:, None] * np.arange(quantized_bins)
    ends = starts + merged[:, None]
    ends[:, -1] = candidates
    sums = cum[ends] - cum[starts]
    total = cum[-1]
    outliers = total - cum[candidates]
    last = h[candidates - 1] + outliers
    counts = (nonzero[ends] - nonzero[starts]).astype(np.float64)
    counts[:, -1] += (last > 0) & (h[candidates - 1] == 0)
    p = sums.copy()
    p[:, -1] += outliers
    q = np.where(counts > 0, np.maximum(sums / np.maximum(counts, 1.0), _KL_EPSILON), 0.0)
    p_log_p = cum_xlogx[candidates - 1] + _xlogx(last)
    p_log_q = np.where(p > 0, p * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
    q_total = (counts * q).sum(axis=1)
    return (p_log_p - p_log_q) / total - np.log(total) + np.log(q_total)


def _point_mass_at_zero(h: np.ndarray) -> float:
    """Counts in the first |x| bin beyond ``h1^2 / h2``, its log-linear extrapolation.

    Exact zeros (ReLU's, padding) are exact at every threshold, so they belong to neither P nor
    Q; a log-concave density (Gaussian, Laplace) has ``h0 <= h1^2 / h2`` and loses nothing.
    """
    if h.size < 3:
        return 0.0
    smooth = h[1] ** 2 / h[2] if h[2] > 0 else h[1]
    return float(max(h[0] - smooth, 0.0))


def _entropy_threshold(edges: np.ndarray, counts: np.ndarray, quantized_bins: int) -> float:
    """The |x| threshold of minimal KL divergence (see the module docstring)."""
    h, width = _abs_histogram(edges, counts)
    if quantized_bins > _KL_MAX_QUANTIZED_BINS:
        return h.size * width
    h[0] -= _point_mass_at_zero(h)
    if not h.sum() > 0:
        return h.size * width
    wanted = _KL_BINS_PER_QUANTIZED_BIN * quantized_bins
    if h.size < wanted:
        factor = -(-wanted // h.size)
        h, width = _resample(h, factor), width / factor
    divergences = _kl_divergences(h, quantized_bins)
    best = quantized_bins + int(np.argmin(np.where(np.isfinite(divergences), divergences, np.inf)))
    return best * width


# ---- mse ----


def _overshoot(edges: np.ndarray, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> sum_{y < x} (x - y)^2`` over bins [a, b) of uniform density, O(log n) per x.

    Whole bins below x give ``x^2 M0 - 2 x M1 + M2`` from prefix sums of their moments
    ``M0 = sum c``, ``M1 = sum c (a + b) / 2``, ``M2 = sum c (a^2 + ab + b^2) / 3``; the bin
    holding x adds ``c / (b - a) * (x - a)^3 / 3``.
    """
    a, b = edges[:-1], edges[1:]
    moments = [counts, counts * (a + b) / 2, counts * (a * a + a * b + b * b) / 3]
    m0, m1, m2 = (np.concatenate(([0.0], np.cumsum(m))) for m in moments)
    width = b - a
    density = np.where(width > 0, counts / np.where(width > 0, width, 1.0), 0.0)

    def overshoot(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        whole = np.searchsorted(b, x, side="right")
        part = np.minimum(whole, a.size - 1)
        partial = np.where(whole < a.size, density[part] * np.maximum(x - a[part], 0.0) ** 3, 0.0)
        return np.maximum(x * x * m0[whole] - 2 * x * m1[whole] + m2[whole] + partial / 3, 0.0)

    return overshoot


def _grid_minimize(
    error: Callable[..., np.ndarray], bounds: list[tuple[float, float]]
) -> tuple[float, ...]:
    """Argmin of ``error`` over a box: a grid per axis, refined around the best point."""
    bounds = list(bounds)
    best: tuple[float, ...] = tuple(hi for _, hi in bounds)
    for _ in range(_GRID_ROUNDS):
        axes = [np.linspace(lo, hi, _GRID_POINTS if hi > lo else 1) for lo, hi in bounds]
        values = np.nan_to_num(error(*np.ix_(*axes)), nan=np.inf)
        index = np.unravel_index(int(np.argmin(values)), values.shape)
        best = tuple(float(axis[i]) for axis, i in zip(axes, index, strict=True))
        bounds = [
            (float(axis[max(i - 1, 0)]), float(axis[min(i + 1, axis.size - 1)]))
            for axis, i in zip(axes, index, strict=True)
        ]
    return best


def _mse_range(
    edges: np.ndarray,
    counts: np.ndarray,
    qtype: QuantType,
    symmetric: bool,
    lo_obs: float,
    hi_obs: float,
) -> tuple[float, float]:
    """The clipping range of least expected squared error (see the module docstring)."""
    unit = max(-lo_obs, hi_obs)  # work in units of max |x|: no overflow in the moments
    e = edges / unit
    zeros = _point_mass_at_zero(_abs_histogram(edges, counts)[0])  # exact: no rounding noise
    below = _overshoot(e, counts)
    mirrored = _overshoot(-e[::-1], counts[::-1])

    def above(x: np.ndarray) -> np.ndarray:  # sum_{y > x} (y - x)^2
        return mirrored(-x)

    def inside(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.maximum(_cdf(e, counts, hi) - _cdf(e, counts, lo) - zeros, 0.0)

    if symmetric:
        half = (qtype.levels - 1) / 2

        def error(t: np.ndarray) -> np.ndarray:
            return below(-t) + above(t) + inside(-t, t) * (t / half) ** 2 / 12

        (t,) = _grid_minimize(error, [(0.0, 1.0)])
        return -t * unit, t * unit

    def error2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        step = (hi - lo) / qtype.levels
        return below(lo) + above(hi) + inside(lo, hi) * step**2 / 12

    lo, hi = _grid_minimize(error2, [(lo_obs / unit, 0.0), (0.0, hi_obs / unit)])
    return lo * unit, hi * unit
