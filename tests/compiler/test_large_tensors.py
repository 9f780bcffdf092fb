"""Large initializers kept out of serialization: exact sizes, sessions on arrays in place."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from models import builders, digits
from onnx_shrink.compiler import io, walk
from onnx_shrink.compiler.io import embedded_weights, large_tensors
from onnx_shrink.runtime_check import sessions
from tests.helpers import parse


def _models() -> list[onnx.ModelProto]:
    return [
        builders.build_transformer_encoder(layers=2, d_model=32, heads=2, d_ff=64),
        builders.build_cnn(),
        onnx.load(digits.MODEL_PATH),
    ]


@pytest.mark.parametrize("min_bytes", [1, 256, 4096, large_tensors.LARGE_TENSOR_BYTES])
@pytest.mark.parametrize("proto", _models(), ids=["transformer", "cnn", "digits"])
def test_saved_bytes_is_the_serialized_length(proto, min_bytes):
    model = io.load(proto)
    assert large_tensors.saved_bytes(model, min_bytes) == len(io.to_bytes(model))


@settings(max_examples=40, deadline=None)
@given(
    sizes=hs.lists(hs.integers(0, 20_000), min_size=1, max_size=4),
    name_length=hs.integers(1, 300),
)
def test_saved_bytes_is_exact_across_varint_boundaries(sizes, name_length):
    """Tensor and graph lengths straddle the 1/2/3-byte varint limits (128, 16384)."""
    model = ir.Model(ir.Graph([], [], nodes=[], name="g"), ir_version=8)
    for index, size in enumerate(sizes):
        name = f"{index}" + "w" * name_length
        value = ir.Value(name=name, const_value=ir.tensor(np.ones(size, np.uint8), name=name))
        model.graph.register_initializer(value)
    assert large_tensors.saved_bytes(model, min_bytes=1) == len(io.to_bytes(model))


def test_measuring_leaves_the_model_as_it_was():
    model = io.load(_models()[0])
    before = io.to_bytes(model)
    large_tensors.saved_bytes(model, min_bytes=1)
    large_tensors.session_source(model, min_bytes=1)
    assert io.to_bytes(model) == before


def test_a_session_on_arrays_in_place_computes_what_the_embedded_model_does():
    model = io.load(_models()[0])
    source = large_tensors.session_source(model, min_bytes=1024)
    assert source.initializers  # the weights really travel apart
    assert len(source.proto) < len(io.to_bytes(model)) / 4
    for name, array in source.initializers.items():
        np.testing.assert_array_equal(array, model.graph.initializers[name].const_value.numpy())
    feed = {"hidden": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)}
    expected = sessions.create_session(io.to_bytes(model)).run(None, feed)
    got = sessions.create_session(source).run(None, feed)
    np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.parametrize("external_data", [True, False], ids=["data-file", "embedded"])
def test_weights_in_files_are_read_by_onnxruntime_not_by_us(tmp_path, monkeypatch, external_data):
    """External data, and large weights embedded in the model file, reach the session as
    references to their file: no array is handed over and no page of ours is touched."""
    monkeypatch.setattr(embedded_weights, "MIN_BYTES", 1024)
    saved = io.save(io.load(_models()[0]), tmp_path / "m.onnx", external_data=external_data)
    model = io.load(saved.path)
    mapped = [
        v.const_value
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]
    source = large_tensors.session_source(model, min_bytes=1024)
    assert mapped and not source.initializers
    assert source.data_folder == str(tmp_path.resolve())
    feed = {"hidden": np.ones((1, 3, 32), np.float32)}
    expected = sessions.create_session(saved.path).run(None, feed)
    np.testing.assert_array_equal(sessions.create_session(source).run(None, feed)[0], expected[0])
    assert all(tensor.raw is None for tensor in mapped)  # never memory-mapped by us


def test_types_numpy_cannot_hold_stay_embedded():
    model = io.load(
        parse(
            '<ir_version: 10, opset_import: ["" : 21]> g (float[2] x) => (float[2] y) {'
            " y = Add(x, x) }"
        )
    )
    value = ir.Value(
        name="b", const_value=ir.tensor(np.zeros(4096, np.uint16), dtype=ir.DataType.BFLOAT16)
    )
    model.graph.register_initializer(value)
    assert "b" not in large_tensors.session_source(model, min_bytes=1).initializers


@pytest.mark.parametrize("min_bytes", [1, 256, 4096])
@pytest.mark.parametrize("proto", _models(), ids=["transformer", "cnn", "digits"])
def test_a_streamed_save_is_byte_for_byte_the_serialized_model(tmp_path, proto, min_bytes):
    model = io.load(proto)
    # A field numbered past raw_data's (doc_string, 12) must stay after it.
    value = max(model.graph.initializers.values(), key=lambda v: v.const_value.nbytes)
    tensor = value.const_value
    value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name, doc_string="a weight")
    large_tensors.write_embedded(model, tmp_path / "m.onnx", min_bytes)
    assert (tmp_path / "m.onnx").read_bytes() == io.to_bytes(model)
    assert large_tensors.saved_bytes(model, min_bytes) == len(io.to_bytes(model))


def test_a_streamed_save_of_mapped_weights_never_reads_them_into_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_weights, "MIN_BYTES", 1024)
    path = io.save(io.load(_models()[0]), tmp_path / "m.onnx").path
    model = io.load(path)
    large_tensors.write_embedded(model, tmp_path / "again.onnx", min_bytes=1024)
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()
    mapped = [t for _, t in walk.initializer_tensors(model) if isinstance(t, ir.ExternalTensor)]
    assert mapped and all(not t.numpy().flags.owndata for t in mapped)
