"""`onnx-shrink check` and `onnx-shrink bench` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from models import digits
from models.perturb import perturbed_copy
from onnx_shrink import console
from onnx_shrink.runtime_check import checker
from onnx_shrink.runtime_check.bench import MIN_TIMED_PAIRS
from onnx_shrink.runtime_check.layers import LayerError, LayerReport
from tests.helpers import reflect_pad_model, save_proto

DATA = digits.TEST_DATA_PATH


def test_check_of_a_model_against_itself_passes(run_cli, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli(
        "check",
        digits.MODEL_PATH,
        digits.MODEL_PATH,
        "--data",
        DATA,
        "--report",
        report,
        "--runs",
        "10",
    )
    assert result.code == 0, result.err
    assert "PASS" in result.out
    figures = json.loads(report.read_text())
    assert figures["passed"] is True
    assert figures["numeric"]["outputs"][0]["snr_db"] == "inf"  # strict JSON has no Infinity


def test_check_of_a_perturbed_copy_fails_with_exit_1_and_names_the_layer(run_cli, tmp_path):
    bad = perturbed_copy(digits.MODEL_PATH, tmp_path / "bad.onnx", "conv2.0.weight", scale=0.5)
    report = tmp_path / "r.json"
    result = run_cli(
        "check",
        digits.MODEL_PATH,
        bad,
        "--data",
        DATA,
        "--layers",
        "--min-cosine",
        "0.9999",
        "--report",
        report,
        "--runs",
        "0",
    )
    assert result.code == 1
    assert "check failed" in result.err
    assert "first error jump: /conv2/conv2.0/Conv_output_0" in result.out
    assert json.loads(report.read_text())["passed"] is False  # the report is still written


def test_check_uses_default_tolerances_without_options(run_cli, tmp_path):
    bad = perturbed_copy(digits.MODEL_PATH, tmp_path / "bad.onnx", "head.1.weight", scale=3.0)
    result = run_cli("check", digits.MODEL_PATH, bad, "--data", DATA, "--runs", "0")
    assert result.code == 1
    assert "cosine" in result.out


def test_check_with_a_missing_provider_is_a_clear_error(run_cli):
    result = run_cli("check", digits.MODEL_PATH, digits.MODEL_PATH, "--ep", "tensorrt")
    assert result.code == 2
    # CPU builds do not list TensorRT; GPU builds list it and then fail to start it.
    assert (
        "execution provider 'tensorrt' is not available" in result.err
        and "available: " in result.err
    ) or "TensorrtExecutionProvider is available in this onnxruntime build but did not" in (
        result.err
    )


def test_bench_reports_percentiles_throughput_memory_and_size(run_cli, tmp_path):
    report = tmp_path / "b.json"
    result = run_cli(
        "bench",
        digits.MODEL_PATH,
        "--batch-sizes",
        "1,16",
        "--threads",
        "1",
        "--runs",
        "10",
        "--report",
        report,
    )
    assert result.code == 0, result.err
    figures = json.loads(report.read_text())
    assert [row["batch"] for row in figures["latency"]] == [1, 16]
    row = figures["latency"][1]
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["throughput"] > 0
    assert figures["peak_memory_bytes"] > 0
    assert figures["size"]["bytes_on_disk"] == digits.MODEL_PATH.stat().st_size
    assert 0 < figures["size"]["zipped_bytes"] < figures["size"]["bytes_on_disk"]


def test_bench_rejects_bad_batch_sizes(run_cli):
    result = run_cli("bench", digits.MODEL_PATH, "--batch-sizes", "1,x")
    assert result.code == 2
    assert "--batch-sizes expects comma-separated integers" in result.err


def test_compile_verify_each_reports_per_pass_verdicts(run_cli, digits_copy, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli(
        digits_copy,
        "--passes",
        "fold",
        "--data",
        DATA,
        "--verify-each",
        "--report",
        report,
        "--runs",
        "0",
    )
    assert result.code == 0, result.err
    step = json.loads(report.read_text())["passes"][0]
    assert step["rolled_back"] is False
    assert "cosine" in step["verdict"]
    # The result is judged by the tolerances each pass kept: a verdict, not "measured, no
    # tolerances given".
    out = " ".join(result.out.split())
    assert "): PASS" in out and "measured, no tolerances given" not in out


def test_a_missing_candidate_to_check_is_bad_input_not_a_broken_candidate(run_cli, tmp_path):
    """A candidate the caller names is their input: only shrink's own result, when
    onnx.checker rejects it, is a broken candidate (exit 3)."""
    result = run_cli("check", digits.MODEL_PATH, tmp_path / "missing.onnx")
    assert result.code == 2 and "no such file" in result.err
    assert "the candidate is broken" not in result.err


def test_bench_of_a_model_its_inputs_do_not_fit_is_one_clear_error(run_cli, tmp_path):
    """A reflect Pad wider than the synthetic input, and than every grown size (64, 256):
    onnxruntime's traceback before. The error is the one on the default dims."""
    model = reflect_pad_model(300)
    path = save_proto(model, tmp_path / "pad.onnx")
    result = run_cli("bench", path, "--runs", "2")
    assert result.code == 2
    assert "failed on its inputs (x=1x16)" in result.err and "--input-shape" in result.err
    assert run_cli("bench", path, "--runs", "2", "--input-shape", "x=1x400").code == 0


def test_accuracy_needs_labels_it_can_score_and_one_hot_labels_count(run_cli, tmp_path):
    import numpy as np

    arrays = np.load(DATA)
    broken = perturbed_copy(digits.MODEL_PATH, tmp_path / "bad.onnx", "head.1.weight", scale=3.0)
    np.savez(tmp_path / "nolabels.npz", image=arrays["image"])
    np.savez(tmp_path / "onehot.npz", image=arrays["image"], labels=np.eye(10)[arrays["labels"]])
    check = ("check", digits.MODEL_PATH, broken, "--runs", "0", "--report", tmp_path / "r.json")
    # One-hot rows are read as their argmax (they were flattened: no accuracy, and a pass).
    result = run_cli(*check, "--data", tmp_path / "onehot.npz", "--min-cosine", "-1")
    numeric = json.loads((tmp_path / "r.json").read_text())["numeric"]
    assert result.code in (0, 1) and numeric["reference_accuracy"] > 0.95
    assert numeric["candidate_accuracy"] is not None
    # Asked for explicitly, an accuracy tolerance without labels is a failure, not a pass.
    result = run_cli(*check, "--data", tmp_path / "nolabels.npz", "--max-accuracy-drop", "0.01")
    assert result.code == 1 and "no accuracy was measured" in result.err
    # By default (check's tolerances) it says so in the verdict.
    result = run_cli(*check[:2], digits.MODEL_PATH, *check[3:], "--data", tmp_path / "nolabels.npz")
    figures = json.loads((tmp_path / "r.json").read_text())
    assert result.code == 0 and figures["verdict"] == "PASS (accuracy not measured)"


def test_a_compile_check_without_tolerances_measures_and_gives_no_verdict(run_cli, tmp_path):
    result = run_cli(
        digits.MODEL_PATH,
        "--passes",
        "fold",
        "-o",
        tmp_path / "f.onnx",
        "--data",
        DATA,
        "--runs",
        "0",
        "--html",
        tmp_path / "r.html",
        "--report",
        tmp_path / "r.json",
    )
    # The table's title wraps with the data path's length: the words, not the layout.
    assert result.code == 0 and "measured, no tolerances given" in " ".join(result.out.split())
    assert "PASS" not in result.out
    verification = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert verification["verdict"] == "measured, no tolerances given"
    html = (tmp_path / "r.html").read_text()
    assert "No tolerances were given" in html and 'class="badge measured"' in html
    # An accuracy tolerance on synthetic inputs (no labels) cannot hold: refused up front.
    result = run_cli(digits.MODEL_PATH, "--passes", "fold", "--max-accuracy-drop", "0.01")
    assert result.code == 2 and "needs labelled --data" in result.err


def test_tolerances_out_of_range_are_errors(run_cli):
    for flag, value in (("--min-cosine", "2"), ("--atol", "nan"), ("--max-accuracy-drop", "-1")):
        result = run_cli("check", digits.MODEL_PATH, digits.MODEL_PATH, flag, value)
        assert result.code == 2 and "must be in" in result.err, (flag, result.err)


def test_counts_below_their_floor_are_errors(run_cli):
    result = run_cli("bench", digits.MODEL_PATH, "--runs", "0")
    assert result.code == 2 and "--runs must be at least 1" in result.err
    result = run_cli("check", digits.MODEL_PATH, digits.MODEL_PATH, "--runs", "-5")
    assert result.code == 2 and "--runs must be at least 0" in result.err


def test_bench_measures_session_memory_at_the_largest_batch_asked_and_says_so(monkeypatch):
    """The memory was measured on the data's whole first feed whatever --batch-sizes said
    (YOLOv8n: 66 MiB with a 16-sample .npz, 25 MiB with one, beside batch-1 rows only)."""
    from onnx_shrink.runtime_check import bench

    fed = []
    monkeypatch.setattr(bench, "session_peak_memory", lambda m, feed, p: fed.append(feed) or 1)
    images = {"image": np.zeros((40, 1, 8, 8), np.float32)}
    report = bench.benchmark(digits.MODEL_PATH, data=images, batch_sizes=(1, 4), runs=2)
    assert [f["image"].shape[0] for f in fed] == [4]
    assert report.peak_memory_batch == 4
    assert "batch 4" in str(console.benchmark_table(report).columns[0]._cells)
    # The header gives one sample's dims, not the data's 40: the rows say the batch.
    assert report.inputs == "image=1x1x8x8"


def test_bench_runs_whole_samples_as_they_are_and_refuses_other_batches(tmp_path, monkeypatch):
    """[frames, features] given N x frames x features: bench cut the sample to one frame (and
    to 8 for "batch 8") while its report said the input was 200 frames."""
    import numpy as np
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as onh
    import pytest

    from onnx_shrink.errors import DataError
    from onnx_shrink.runtime_check import bench

    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["frames", 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["frames", 3])],
        [onh.from_array(np.ones((4, 3), np.float32), "w")],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.rand(3, 200, 4).astype(np.float32))
    timed = []
    measure = bench.measure_latency
    monkeypatch.setattr(
        bench,
        "measure_latency",
        lambda session, feed, **kw: timed.append(feed["x"].shape) or measure(session, feed, **kw),
    )
    report = bench.benchmark(tmp_path / "m.onnx", data=tmp_path / "d.npz", runs=2, memory=False)
    assert report.inputs == "x=200x4" and [row.batch for row in report.latency] == [1]
    assert timed == [(200, 4)]
    with pytest.raises(DataError, match="only batch size 1"):
        bench.benchmark(tmp_path / "m.onnx", data=tmp_path / "d.npz", batch_sizes=(1, 8))


def test_check_runs_given_are_timed_all_whatever_they_take(run_cli, tmp_path, monkeypatch):
    # Without --runs the check's budget applies (0 s here: the fewest pairs); --runs N times N.
    monkeypatch.setattr(checker, "LATENCY_SECONDS", 0.0)
    report = tmp_path / "r.json"
    base = ("check", digits.MODEL_PATH, digits.MODEL_PATH, "--data", DATA, "--report", report)
    assert run_cli(*base).code == 0
    assert json.loads(report.read_text())["latency"]["reference"]["runs"] == MIN_TIMED_PAIRS
    assert run_cli(*base, "--runs", "7").code == 0
    assert json.loads(report.read_text())["latency"]["reference"]["runs"] == 7


def test_the_first_error_jump_of_an_unnamed_node_shows_its_op_type_alone():
    # Found in an audit (CenterFace's nodes have no names): "363 (Conv )".
    jump = LayerError("363", "363", "Conv", "", 0, 0.5, 1.0, 0.9, 6.0, 0.01)
    report = LayerReport((jump,), ("363",), jump, 16, 0, 0.05, 10.0)
    title = str(console.layers_table(report).title)
    assert "first error jump: 363 (Conv), relative error" in title
    named = dataclasses.replace(jump, node="/conv1/Conv")
    title = str(console.layers_table(dataclasses.replace(report, first_jump=named)).title)
    assert "363 (Conv /conv1/Conv)" in title
