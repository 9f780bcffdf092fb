"""The statistics engine: exact, batch-independent, bounded, and honest about sentinels."""

from __future__ import annotations

import numpy as np
import pytest

from models import digits
from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import data_files
from onnx_shrink.compiler.statistics import StatRequest
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import collect, data
from tests.helpers import parse, run_ort


class OneSampleReader:
    """A CalibrationDataReader-style object feeding one sample per get_next()."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = list(images)

    def get_next(self):
        return {"image": self.images.pop(0)[np.newaxis]} if self.images else None


def _requests(model):
    names = [node.outputs[0].name for node in model.graph][:8]
    return (
        [StatRequest(n, "minmax") for n in names]
        + [StatRequest(n, "histogram", bins=256) for n in names[:4]]
        + [
            StatRequest(names[2], "channel_absmax", axis=1),
            StatRequest(names[2], "channel_sqnorm", axis=1),
            StatRequest("image", "gram"),
        ]
    )


def test_one_batch_of_n_and_n_batches_of_one_give_identical_statistics(tmp_path):
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    images = data_files.load_npz(digits.TEST_DATA_PATH)["image"][:40]
    np.savez(tmp_path / "all.npz", image=images)
    batched = collect.collect(model, _requests(model), data.prepare(specs, tmp_path / "all.npz"))
    single = collect.collect(model, _requests(model), data.prepare(specs, OneSampleReader(images)))
    assert batched.samples == single.samples == 40
    for request in _requests(model):
        a, b = batched.results[request], single.results[request]
        if request.kind in ("minmax",):
            assert a == b
        elif request.kind == "histogram":
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


def test_statistics_match_numpy_on_the_full_tensors(tmp_path):
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    images = data_files.load_npz(digits.TEST_DATA_PATH)["image"][:16]
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


def test_tensors_not_in_the_main_graph_are_an_error():
    model = io.load(digits.MODEL_PATH)
    specs = data.specs_from_model(model)
    with pytest.raises(ShrinkError, match="does not produce: nowhere"):
        collect.collect(model, [StatRequest("nowhere", "minmax")], data.prepare(specs, None))


def test_a_sample_the_model_rejects_is_one_clear_error(tmp_path):
    """Silero VAD's reflect Pad needs more samples than a short synthetic input has."""
    model = io.load(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T] x) => (float[N, T2] y) {
      pads = Constant <value = int64[4] {0, 8, 0, 8}> ()
      y = Pad <mode = "reflect"> (x, pads)
    }
    """)
    )
    np.savez(tmp_path / "short.npz", x=np.ones((1, 4), np.float32))
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "short.npz")
    with pytest.raises(
        ShrinkError, match=r"failed on a calibration sample \(x=1x4\).*--input-shape"
    ):
        collect.collect(model, [StatRequest("y", "minmax")], dataset)
