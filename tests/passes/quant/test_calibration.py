"""Range selection for static quantization: minmax, percentile, entropy (KL) and mse."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_shrink.compiler.statistics import (
    Histogram,
    HistogramAccumulator,
    MinMax,
    MinMaxAccumulator,
)
from onnx_shrink.passes.quant.calibration import METHODS, _overshoot, tensor_range
from onnx_shrink.passes.quant.numerics import (
    QUANT_TYPES,
    dequantize,
    quantize,
    scale_and_zero_point,
)

S8, U8 = QUANT_TYPES["s8"], QUANT_TYPES["u8"]
# (qtype, symmetric): how activations are quantized in practice
SCHEMES = [pytest.param(S8, True, id="s8-symmetric"), pytest.param(U8, False, id="u8-asymmetric")]


def statistics(batches: list[np.ndarray], bins: int = 2048) -> tuple[MinMax, Histogram]:
    """MinMax, then a histogram over its range: the two passes runtime_check.collect makes."""
    minmax = MinMaxAccumulator()
    for batch in batches:
        minmax.add(batch)
    result = minmax.result()
    histogram = HistogramAccumulator(result.minimum, result.maximum, bins)
    for batch in batches:
        histogram.add(batch)
    return result, histogram.result()


def quantization_mse(x: np.ndarray, lo: float, hi: float, qtype, symmetric: bool) -> float:
    scale, zero = scale_and_zero_point(lo, hi, qtype, symmetric)
    restored = dequantize(quantize(x, scale, zero, qtype), scale, zero)
    return float(np.mean((restored.astype(np.float64) - x) ** 2))


@functools.cache
def gaussian_with_outliers() -> np.ndarray:
    """10^6 standard normal values and three outliers far out (30 to 40 sigma)."""
    x = np.random.default_rng(0).standard_normal(1_000_000)
    return np.concatenate([x, [40.0, -35.0, 30.0]]).astype(np.float32)


@functools.cache
def laplace() -> np.ndarray:
    return np.random.default_rng(1).laplace(size=1_000_000).astype(np.float32)


@functools.cache
def post_relu() -> np.ndarray:
    x = np.random.default_rng(2).standard_normal(1_000_000) * 2.0 + 0.5
    return np.maximum(x, 0.0).astype(np.float32)


DATA = {"gaussian+outliers": gaussian_with_outliers, "laplace": laplace, "post-relu": post_relu}


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
        | st.sampled_from([np.inf, -np.inf, np.nan]),
    ),
    method=st.sampled_from(METHODS),
    qtype=st.sampled_from(sorted(QUANT_TYPES)),
    symmetric=st.booleans(),
    bins=st.sampled_from([1, 3, 128, 2048]),
    percentile=st.floats(0.01, 100.0),
)
def test_every_method_gives_a_finite_range_around_zero_inside_the_data(
    x, method, qtype, symmetric, bins, percentile
):
    minmax, histogram = statistics([x], bins)
    qt = QUANT_TYPES[qtype]
    lo, hi = tensor_range(method, minmax, histogram, qt, symmetric=symmetric, percentile=percentile)
    assert np.isfinite(lo) and np.isfinite(hi)
    assert min(minmax.minimum, 0.0) <= lo <= 0.0 <= hi <= max(minmax.maximum, 0.0)
    scale, _ = scale_and_zero_point(lo, hi, qt, symmetric)
    assert np.isfinite(scale) and scale > 0


def test_minmax_is_the_finite_min_and_max_widened_to_zero():
    x = np.array([2.0, 5.0, np.inf, -np.inf, np.nan, 3.0], np.float32)
    minmax, histogram = statistics([x])
    assert tensor_range("minmax", minmax, None, S8, symmetric=True) == (0.0, 5.0)
    y = np.array([-7.5, -1.0, 4.25], np.float32)
    assert tensor_range("minmax", *statistics([y]), U8, symmetric=False) == (-7.5, 4.25)


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
def test_percentile_100_is_minmax(name, qtype, symmetric):
    minmax, histogram = statistics([DATA[name]()])
    expected = tensor_range("minmax", minmax, None, qtype, symmetric=symmetric)
    got = tensor_range("percentile", minmax, histogram, qtype, symmetric=symmetric, percentile=100)
    assert got == expected


def test_percentile_99_clips_one_percent_of_abs_values_to_within_a_bin():
    x = laplace()
    minmax, histogram = statistics([x])
    width = float(histogram.edges[1] - histogram.edges[0])
    lo, hi = tensor_range("percentile", minmax, histogram, S8, symmetric=True, percentile=99)
    assert lo == -hi
    a = np.abs(x)
    assert np.mean(a > hi + width) <= 0.01 <= np.mean(a > hi - width)


def test_percentile_99_asymmetric_clips_half_a_percent_on_each_side_to_within_a_bin():
    x = laplace()
    minmax, histogram = statistics([x])
    width = float(histogram.edges[1] - histogram.edges[0])
    lo, hi = tensor_range("percentile", minmax, histogram, U8, symmetric=False, percentile=99)
    assert np.mean(x < lo - width) <= 0.005 <= np.mean(x < lo + width)
    assert np.mean(x > hi + width) <= 0.005 <= np.mean(x > hi - width)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
def test_gaussian_outliers_are_clipped_and_the_error_drops(method, qtype, symmetric):
    x = gaussian_with_outliers()
    minmax, histogram = statistics([x])
    lo, hi = tensor_range(method, minmax, histogram, qtype, symmetric=symmetric)
    assert hi - lo < 0.5 * (minmax.maximum - minmax.minimum)
    assert hi > 3.0 and lo < -3.0  # the Gaussian itself is kept
    error = quantization_mse(x, lo, hi, qtype, symmetric)
    minmax_error = quantization_mse(x, minmax.minimum, minmax.maximum, qtype, symmetric)
    assert error < 0.6 * minmax_error


@pytest.mark.parametrize("bins", [2048, 512, 128, 32])
@pytest.mark.parametrize("name", ["gaussian+outliers", "laplace"])
def test_entropy_clips_a_heavy_tail_at_any_histogram_resolution(name, bins):
    """onnxruntime 1.31 returns minmax with 128 bins: no candidate threshold below the max."""
    x = DATA[name]()
    minmax, histogram = statistics([x], bins)
    lo, hi = tensor_range("entropy", minmax, histogram, S8, symmetric=True)
    amax = max(-minmax.minimum, minmax.maximum)
    assert hi < 0.8 * amax and lo == -hi
    assert quantization_mse(x, lo, hi, S8, True) < quantization_mse(x, -amax, amax, S8, True)


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
def test_mse_is_at_least_as_good_as_minmax_percentile_and_entropy(name, qtype, symmetric):
    x = DATA[name]()
    minmax, histogram = statistics([x])
    errors = {
        method: quantization_mse(
            x,
            *tensor_range(method, minmax, histogram, qtype, symmetric=symmetric),
            qtype,
            symmetric,
        )
        for method in METHODS
    }
    assert errors["mse"] <= 1.02 * min(errors.values()), errors


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
def test_range_is_the_same_for_one_batch_or_seven(method, qtype, symmetric):
    x = gaussian_with_outliers()[:200_003]
    whole = tensor_range(method, *statistics([x]), qtype, symmetric=symmetric)
    split = tensor_range(method, *statistics(np.array_split(x, 7)), qtype, symmetric=symmetric)
    assert whole == split


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
@pytest.mark.parametrize(
    ("values", "expected"),
    [(0.0, (0.0, 0.0)), (3.0, (0.0, 3.0)), (-2.5, (-2.5, 0.0))],
    ids=["zeros", "positive", "negative"],
)
def test_constant_tensor_gets_its_value_and_zero(method, qtype, symmetric, values, expected):
    x = np.full(1000, values, np.float32)
    lo, hi = tensor_range(method, *statistics([x]), qtype, symmetric=symmetric)
    assert lo == pytest.approx(expected[0]) and hi == pytest.approx(expected[1])
    scale, _ = scale_and_zero_point(lo, hi, qtype, symmetric)
    assert np.isfinite(scale) and scale > 0
    assert np.allclose(quantization_mse(x, lo, hi, qtype, symmetric), 0.0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_empty_or_nonfinite_only_tensor_gets_a_valid_range(method):
    nonfinite = np.array([np.inf, -np.inf, np.nan], np.float32)
    assert tensor_range(method, *statistics([nonfinite]), S8, symmetric=True) == (0.0, 0.0)
    empty = Histogram(np.linspace(-1.0, 2.0, 9), np.zeros(8, np.int64))
    lo, hi = tensor_range(method, MinMax(-1.0, 2.0, 0, 0), empty, U8, symmetric=False)
    assert (lo, hi) == (-1.0, 2.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("qtype", "symmetric"), SCHEMES)
def test_nonfinite_values_are_ignored(method, qtype, symmetric):
    x = laplace()[:100_000]
    masked = np.concatenate([x, np.full(500, -np.inf, np.float32), [np.nan, np.inf]])
    clean = tensor_range(method, *statistics([x]), qtype, symmetric=symmetric)
    assert tensor_range(method, *statistics([masked]), qtype, symmetric=symmetric) == clean


@pytest.mark.parametrize("method", METHODS)
def test_post_relu_data_gets_lo_zero_for_asymmetric_u8(method):
    x = post_relu()
    minmax, histogram = statistics([x])
    lo, hi = tensor_range(method, minmax, histogram, U8, symmetric=False)
    assert lo == 0.0 and 0.5 * minmax.maximum < hi <= minmax.maximum
    minmax_error = quantization_mse(x, 0.0, minmax.maximum, U8, False)
    assert quantization_mse(x, lo, hi, U8, False) <= 1.1 * minmax_error


def test_entropy_keeps_the_full_range_for_16_bit_types():
    minmax, histogram = statistics([gaussian_with_outliers()])
    lo, hi = tensor_range("entropy", minmax, histogram, QUANT_TYPES["s16"], symmetric=True)
    assert (lo, hi) == (minmax.minimum, minmax.maximum)


def test_bad_arguments_are_rejected():
    minmax, histogram = statistics([np.arange(10, dtype=np.float32)])
    with pytest.raises(ValueError, match="needs a histogram"):
        tensor_range("entropy", minmax, None, S8, symmetric=True)
    with pytest.raises(ValueError, match="percentile"):
        tensor_range("percentile", minmax, histogram, S8, symmetric=True, percentile=0.0)
    with pytest.raises(ValueError, match="unknown calibration method"):
        tensor_range("kl", minmax, histogram, S8, symmetric=True)  # type: ignore[arg-type]


def test_mse_clipping_error_closed_form_matches_the_sum_over_bins():
    """sum_{y < x} (x - y)^2 from prefix moments == the per-bin integral, term by term."""
    edges = np.linspace(-0.7, 1.0, 301)
    counts = np.random.default_rng(3).integers(0, 50, 300).astype(np.float64)
    x = np.linspace(-1.0, 1.2, 97)
    a, b = edges[:-1], edges[1:]
    per_bin = np.maximum(x[:, None] - a, 0) ** 3 - np.maximum(x[:, None] - b, 0) ** 3
    expected = (per_bin * counts / (b - a)).sum(axis=1) / 3
    np.testing.assert_allclose(_overshoot(edges, counts)(x), expected, rtol=1e-9, atol=1e-9)


def test_a_scalar_constant_quantizes_to_a_scalar():
    """A 0-d weight (the ``3`` of a decomposed hard-swish) round-trips like any other."""
    scale = np.asarray(0.05, np.float32)
    zero = np.asarray(0, np.int8)
    q = quantize(np.asarray(3.0, np.float32), scale, zero, S8)
    assert q.shape == () and q.dtype == np.int8 and int(q) == 60


@pytest.mark.parametrize(("method", "bins", "counted"), [("entropy", 128, 2048), ("mse", 128, 128)])
def test_entropy_counts_histograms_fine_enough_for_its_divergence(method, bins, counted):
    """Resampled from 128 bins, a one-sided u8 tensor with a few far outliers kept its whole
    range (its smooth tail has the lowest divergence): entropy counts at least 2048 bins."""
    from onnx_shrink.compiler import io
    from onnx_shrink.passes.quant.static import QuantPass
    from tests.passes.quant.test_static_placement import _conv_relu_pool

    requests = QuantPass(calibration=method, bins=bins).requests(io.load(_conv_relu_pool()))
    assert {r.bins for r in requests if r.kind == "histogram"} == {counted}


def test_entropy_clips_far_outliers_of_one_sided_u8_data_at_the_bins_quant_counts():
    x = post_relu().copy()  # the cached array is shared
    x[:5] = 15 * x.max()
    minmax, histogram = statistics([x], 2048)
    lo, hi = tensor_range("entropy", minmax, histogram, U8, symmetric=False)
    assert lo == 0.0 and hi < 0.2 * minmax.maximum


def test_entropy_needs_a_histogram_of_many_values_per_level():
    from onnx_shrink.passes.quant.calibration import too_sparse_for_entropy

    rng = np.random.default_rng(31)
    for values, sparse in ((512, True), (8000, True), (20_000, False), (1_000_000, False)):
        x = np.maximum(rng.standard_normal(values) + 0.5, 0.0).astype(np.float32)  # one-sided
        minmax, histogram = statistics([x])
        assert too_sparse_for_entropy(minmax, histogram, U8, symmetric=False) is (values < 64 * 256)
        assert (values < 64 * 256) is sparse
    minmax, histogram = statistics([laplace()[:9000]])  # two-sided: 64 * 128 levels of |x|
    assert not too_sparse_for_entropy(minmax, histogram, U8, symmetric=False)
