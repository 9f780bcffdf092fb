"""Weights embedded in a model file stay in the file: mapped, never parsed into memory."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import builders
from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import embedded_weights, large_tensors
from onnx_shrink.errors import BadModelError
from tests.helpers import run_ort

MIN_BYTES = 4096


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(embedded_weights, "MIN_BYTES", MIN_BYTES)


@pytest.fixture
def model_file(tmp_path):
    proto = builders.build_transformer_encoder(layers=2, d_model=32, heads=2, d_ff=64)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    return path


def _mapped(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    return {
        name: v.const_value
        for name, v in model.graph.initializers.items()
        if isinstance(v.const_value, ir.ExternalTensor)
    }


def test_large_weights_are_read_from_the_file_in_place(small_threshold, model_file):
    model = io.load(model_file)
    initializers = onnx.load(model_file).graph.initializer
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in initializers}
    mapped = _mapped(model)
    assert mapped and set(mapped) == {n for n, a in reference.items() if a.nbytes >= MIN_BYTES}
    for name, tensor in mapped.items():
        assert tensor.path == str(model_file.resolve())
        np.testing.assert_array_equal(tensor.numpy(), reference[name])
        assert not tensor.numpy().flags.owndata  # a view of the mapped file
    for name, value in model.graph.initializers.items():
        if name not in mapped:
            np.testing.assert_array_equal(value.const_value.numpy(), reference[name])


def test_a_mapped_model_saves_to_the_bytes_it_came_from(small_threshold, model_file, tmp_path):
    model = io.load(model_file)
    assert _mapped(model)
    size = large_tensors.saved_bytes(model)
    saved = io.save(model, tmp_path / "again.onnx")
    assert size == saved.bytes_on_disk
    assert saved.path.read_bytes() == io.to_bytes(model)
    # The same bytes as a whole parse writes (io.save only leaves the default domain unset).
    whole = io.load(onnx.load(model_file))
    assert saved.path.read_bytes() == io.to_bytes(whole)
    feed = {"hidden": np.ones((1, 3, 32), np.float32)}
    np.testing.assert_array_equal(run_ort(saved.path, feed)[0], run_ort(model_file, feed)[0])


def test_the_model_file_is_its_only_file(small_threshold, model_file):
    assert io.model_files(model_file) == [model_file]
    assert io.file_bytes(model_file) == model_file.stat().st_size


def test_a_symlinked_model_maps_its_target(small_threshold, model_file, tmp_path):
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    link = elsewhere / "link.onnx"
    link.symlink_to(model_file)
    mapped = _mapped(io.load(link))
    assert mapped and all(t.path == str(model_file.resolve()) for t in mapped.values())
    direct = _mapped(io.load(model_file))
    for name, tensor in mapped.items():
        np.testing.assert_array_equal(tensor.numpy(), direct[name].numpy())


def test_a_hard_linked_model_is_parsed_whole(small_threshold, model_file, tmp_path):
    """onnx_ir refuses to map data from a file with several links (a hard-link attack)."""
    os.link(model_file, tmp_path / "second-name.onnx")
    model = io.load(model_file)
    assert not _mapped(model)
    assert large_tensors.saved_bytes(model) == len(io.to_bytes(model))


def test_weights_shorter_than_their_shape_are_rejected(small_threshold, model_file, tmp_path):
    proto = onnx.load(model_file)
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    big.raw_data = big.raw_data[:-4]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(BadModelError, match=f"tensor '{big.name}' holds .* bytes of data"):
        io.load(bad)


def test_a_truncated_file_is_still_named_truncated(small_threshold, model_file, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(BadModelError, match="truncated"):
        io.load(cut)


@pytest.mark.parametrize("cut", [1, 7, 100, 1000])
def test_the_walk_refuses_cut_messages(small_threshold, model_file, tmp_path, cut):
    path = tmp_path / "cut.onnx"
    path.write_bytes(model_file.read_bytes()[:cut])
    with pytest.raises(embedded_weights.Malformed):
        embedded_weights.read_model(path)


def test_a_mapped_weight_keeps_its_doc_string_and_metadata(small_threshold, tmp_path):
    proto = builders.build_transformer_encoder(layers=1, d_model=32, heads=2, d_ff=64)
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    weight.doc_string = "a weight"
    weight.metadata_props.add(key="k", value="v")
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    tensor = _mapped(io.load(path))[weight.name]
    assert (tensor.doc_string, dict(tensor.metadata_props)) == ("a weight", {"k": "v"})
