"""Model I/O: metadata kept, atomic writes, external data, inputs untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import large_tensors, zipped
from onnx_shrink.errors import ShrinkError
from tests.helpers import files_in, parse, run_ort, sha256

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17], producer_name: "exporter", doc_string: "a model",
 metadata_props: ["origin" : "unit-test"]>
g (float[N, 4] x) => (float[N, 2] y) <float[4, 2] w = {1, 2, 3, 4, 5, 6, 7, 8}> {
  y = MatMul(x, w)
}
"""


def test_save_keeps_opsets_metadata_doc_and_the_exporters_name(tmp_path):
    model = io.load(parse(MLP_TEXT))
    io.save(model, tmp_path / "out.onnx")
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert saved.producer_name == "exporter"
    assert saved.doc_string == "a model"
    assert {p.key: p.value for p in saved.metadata_props} == {"origin": "unit-test"}
    assert [(o.domain, o.version) for o in saved.opset_import] == [("", 17)]
    assert files_in(tmp_path) == {"out.onnx"}  # no staging leftovers


def test_a_model_without_a_producer_is_saved_as_it_is(tmp_path):
    # Naming ourselves the producer made a pass that changed nothing grow the file.
    model = io.load(parse(MLP_TEXT))
    model.producer_name = None
    io.save(model, tmp_path / "out.onnx")
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert (saved.producer_name, saved.producer_version) == ("", "")
    assert model.producer_name is None


def test_external_data_on_request_is_written_fresh_beside_the_model(tmp_path):
    model = io.load(digits.MODEL_PATH)
    stale = tmp_path / "out.onnx.data"
    stale.write_bytes(b"x" * 10_000_000)  # an old file must be replaced, not appended to
    saved = io.save(model, tmp_path / "out.onnx", external_data=True)
    assert saved.external_data_path == stale
    assert stale.stat().st_size < 1_000_000
    assert saved.bytes_on_disk == io.file_bytes(tmp_path / "out.onnx")
    feed = {"image": np.zeros((2, 1, 8, 8), np.float32)}
    np.testing.assert_allclose(
        run_ort(tmp_path / "out.onnx", feed)[0], run_ort(digits.MODEL_PATH, feed)[0], rtol=1e-6
    )


def test_model_with_external_data_reloads_and_embeds_when_small(tmp_path):
    first = io.save(io.load(digits.MODEL_PATH), tmp_path / "ext.onnx", external_data=True)
    reloaded = io.load(first.path)
    assert any(isinstance(t, ir.ExternalTensor) for _, t in _initializers(reloaded))
    (tmp_path / "elsewhere").mkdir()
    second = io.save(reloaded, tmp_path / "elsewhere" / "embedded.onnx")
    assert second.external_data_path is None
    assert files_in(tmp_path / "elsewhere") == {"embedded.onnx"}
    onnx.checker.check_model(str(second.path))


def test_size_decides_external_data_automatically(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    saved = io.save(io.load(digits.MODEL_PATH), tmp_path / "big.onnx")
    assert saved.external_data_path is not None


def test_failed_save_leaves_the_previous_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def explode(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half a mod")
        raise OSError("disk full")

    monkeypatch.setattr(large_tensors, "write_embedded", explode)
    with pytest.raises(ShrinkError, match="cannot write the model \\(disk full\\)"):
        io.save(io.load(digits.MODEL_PATH), target)
    assert target.read_bytes() == b"previous"
    assert files_in(tmp_path) == {"out.onnx"}


def test_loading_in_memory_models_never_touches_them():
    proto = parse(MLP_TEXT)
    before = proto.SerializeToString()
    loaded = io.load(proto)
    loaded.graph.remove(loaded.graph.node(0), safe=False)
    assert proto.SerializeToString() == before

    ir_model = ir.serde.deserialize_model(parse(MLP_TEXT))
    reference = ir.serde.serialize_model(ir_model).SerializeToString()
    clone = io.load(ir_model)
    clone.graph.remove(clone.graph.node(0), safe=False)
    assert ir.serde.serialize_model(ir_model).SerializeToString() == reference


def test_loading_a_file_does_not_change_it(digits_copy):
    before = sha256(digits_copy)
    model = io.load(digits_copy)
    model.graph.remove(model.graph.node(0), safe=False)
    assert sha256(digits_copy) == before


def test_serialized_bytes_matches_the_saved_file(tmp_path):
    model = io.load(digits.MODEL_PATH)
    saved = io.save(model, tmp_path / "m.onnx")
    assert large_tensors.saved_bytes(model) == saved.bytes_on_disk


def test_saving_into_a_missing_folder_is_a_clear_error(tmp_path):
    from onnx_shrink.errors import ShrinkError

    with pytest.raises(ShrinkError, match="the output folder does not exist"):
        io.save(io.load(digits.MODEL_PATH), tmp_path / "nope" / "m.onnx")


def _initializers(model):
    for graph in model.graphs():
        for value in graph.initializers.values():
            yield value, value.const_value


def test_shrink_s_result_is_self_contained_whatever_saves_it(tmp_path):
    # The loader leaves weights of 1 MiB or more in the input file; the result handed back
    # must not point there: serialized by onnx_ir or onnx, it loads from anywhere, and after
    # the input is gone.
    import onnx_shrink

    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[2, 512] x) => (float[2, 512] y) '
        "{ y = MatMul(x, w) }"
    )
    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    source = tmp_path / "in.onnx"
    source.write_bytes(model.SerializeToString())
    result = onnx_shrink.shrink(source, "fold", check=False)
    source.unlink()
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    ir.save(result.model, elsewhere / "out.onnx")
    x = np.ones((2, 512), np.float32)
    for saved in (elsewhere / "out.onnx", ir.to_proto(result.model).SerializeToString()):
        (y,) = run_ort(saved, {"x": x})
        np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)


def test_saving_with_external_data_a_model_loaded_from_external_data(tmp_path):
    # onnx_ir closed the mapping of each small external tensor as it saved, which raised
    # BufferError while fold still held a view of one.
    import onnx_shrink

    source = tmp_path / "m.onnx"
    onnx.save_model(
        onnx.load(str(digits.MODEL_PATH)),
        str(source),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    out = tmp_path / "out.onnx"
    onnx_shrink.shrink(source, "fold", output=out, external_data=True, check=False)
    assert (tmp_path / "out.onnx.data").is_file()
    feed = {"image": np.zeros((1, 1, 8, 8), np.float32)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(digits.MODEL_PATH, feed)[0])


def test_zipped_size_is_exact_up_to_its_limit_and_a_close_estimate_past_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    half = rng.standard_normal(300_000).astype(np.float32)
    half[rng.random(half.size) < 0.5] = 0  # pruned: zeros compress
    data = half.tobytes() * 4
    path = tmp_path / "m.bin"
    path.write_bytes(data)
    exact, estimated = io.zipped_size([path])
    assert not estimated and exact == io.zipped_bytes([path])
    monkeypatch.setattr(zipped, "ZIP_EXACT_BYTES", 1 << 20)
    monkeypatch.setattr(zipped, "ZIP_SAMPLE_BYTES", 64 << 10)
    for source in ([path], data):
        sampled, estimated = io.zipped_size(source)
        assert estimated and abs(sampled - exact) / exact < 0.05
