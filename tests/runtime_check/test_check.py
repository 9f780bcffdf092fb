"""check(): a model against itself, and against a perturbed copy, on the digits model; models
that fail to run on the data."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import pytest

from models import digits
from models.perturb import perturbed_copy
from onnx_shrink import console
from onnx_shrink.errors import CandidateFailedError, RunFailedError
from onnx_shrink.runtime_check import declared_outputs, sessions
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check.bench import MIN_TIMED_PAIRS
from onnx_shrink.runtime_check.checker import check, compare
from onnx_shrink.runtime_check.numeric_report import Tolerances
from tests.helpers import parse, reflect_pad_model, save_proto

DATA = digits.TEST_DATA_PATH


def test_a_model_against_itself_has_zero_error_and_a_ratio_near_one():
    report = check(
        digits.MODEL_PATH,
        digits.MODEL_PATH,
        DATA,
        layers=True,
        latency_runs=40,
        tolerances=Tolerances(atol=0, min_cosine=1.0, max_accuracy_drop=0),
    )
    assert report.passed
    (out,) = report.numeric.outputs
    assert out.max_abs_error == 0 and out.cosine == pytest.approx(1.0)
    assert report.numeric.samples == 450
    assert report.numeric.reference_accuracy == report.numeric.candidate_accuracy >= 0.95
    assert report.layers.first_jump is None
    assert all(layer.relative_error == 0 for layer in report.layers.layers)
    assert 0.5 < report.latency.ratio < 2.0


def test_a_perturbed_layer_fails_and_is_named_first(tmp_path):
    bad = perturbed_copy(digits.MODEL_PATH, tmp_path / "bad.onnx", "conv2.0.weight", scale=0.5)
    report = check(
        digits.MODEL_PATH,
        bad,
        DATA,
        layers=True,
        latency_runs=0,
        tolerances=Tolerances(min_cosine=0.9999),
    )
    assert not report.passed
    assert report.layers.first_jump.tensor == "/conv2/conv2.0/Conv_output_0"
    assert report.layers.first_jump.op_type == "Conv"
    errors = {layer.tensor: layer.relative_error for layer in report.layers.layers}
    assert errors["/conv1/conv1.2/Relu_output_0"] == 0  # upstream of the perturbation


def test_the_first_layer_to_produce_nan_is_named_as_the_jump(tmp_path):
    """A NaN weight in the head: its output is the jump (error ∞ from 0 upstream), not the
    layers after it, and no layer reads as error-free."""
    import onnx
    import onnx.numpy_helper as nh

    model = onnx.load(str(digits.MODEL_PATH))
    weight = next(t for t in model.graph.initializer if t.name == "head.1.weight")
    array = nh.to_array(weight).copy()
    array[0, 0] = np.nan
    weight.CopyFrom(nh.from_array(array, weight.name))
    bad = save_proto(model, tmp_path / "nan.onnx")
    report = check(digits.MODEL_PATH, bad, DATA, layers=True, latency_runs=0)
    assert not report.passed
    assert report.layers.first_jump.tensor == "/head/head.1/Gemm_output_0"
    (logits,) = report.numeric.outputs
    assert logits.relative_error == math.inf and math.isnan(logits.cosine)


def test_compare_returns_a_numeric_report_with_accuracy():
    report = compare(digits.MODEL_PATH, digits.MODEL_PATH, DATA)
    assert report.reference_accuracy == report.candidate_accuracy
    assert report.to_dict()["passed"] is True


# reflect_pad_model's signature, but the output is a reshape that only 3 elements a row fit.
RESHAPE_BY_THREE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, T] x) => (float[N, T2] y) {
  shape = Constant <value = int64[2] {-1, 3}> ()
  y = Reshape (x, shape)
}
"""


def test_a_reference_the_data_does_not_fit_is_one_clear_error(tmp_path):
    reference = save_proto(reflect_pad_model(8), tmp_path / "ref.onnx")
    np.savez(tmp_path / "short.npz", x=np.ones((1, 4), np.float32))
    with pytest.raises(RunFailedError, match=r"ref\.onnx failed on a check sample \(x=1x4\)"):
        compare(reference, reference, tmp_path / "short.npz")
    # Synthetic inputs: the shapes are ours, so the user is told how to choose others.
    with pytest.raises(RunFailedError, match=r"synthetic check sample .*--input-shape"):
        compare(reference, reference, input_shapes={"x": [1, 4]})


def test_check_and_bench_without_data_grow_the_dims_the_model_fails_on(tmp_path, caplog):
    """A reflect Pad of 40 refuses synthetic rows of 16; at 64 it runs, as the compile's check
    does (``shrink`` ran YOLOv8n at 64x64 where ``check`` and ``bench`` failed at 16x16).
    Given data, nothing grows: the data are the user's."""
    from onnx_shrink.runtime_check.bench import benchmark

    model = save_proto(reflect_pad_model(40), tmp_path / "pad.onnx")
    result = check(model, model, latency_runs=0)
    assert result.numeric.passed and "x=1x64" in result.numeric.data
    assert benchmark(model, runs=1, warmup=0, memory=False).inputs == "x=1x64"
    warned = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(warned) == 2 and all("x=1x16" in w and "x=1x64" in w for w in warned)
    assert "for the check" in warned[0] and "for the benchmark" in warned[1]
    np.savez(tmp_path / "short.npz", x=np.ones((1, 16), np.float32))
    with pytest.raises(RunFailedError, match=r"failed on a check sample \(x=1x16\)"):
        check(model, model, tmp_path / "short.npz", latency_runs=0)


def test_a_candidate_that_fails_where_the_reference_runs_is_called_broken(tmp_path):
    reference = save_proto(reflect_pad_model(8), tmp_path / "ref.onnx")
    candidate = save_proto(parse(RESHAPE_BY_THREE), tmp_path / "cand.onnx")
    np.savez(tmp_path / "long.npz", x=np.ones((1, 16), np.float32))
    with pytest.raises(RunFailedError, match=r"cand\.onnx failed .*broken") as caught:
        compare(reference, candidate, tmp_path / "long.npz")
    assert "ref.onnx" in str(caught.value)  # the reference ran: it is named as the witness


def test_a_candidate_whose_inputs_are_named_otherwise_is_named_as_such(tmp_path):
    # It read "the candidate is broken": the models differ in their interface, not in whether
    # the candidate runs.
    from onnx_shrink.errors import CandidateFailedError

    reference = parse(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) '
        "{ y = Relu(x) }"
    )
    candidate = parse(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] inp) => (float[N, 4] y) '
        "{ y = Relu(inp) }"
    )
    with pytest.raises(CandidateFailedError, match="has no input 'x'.*its inputs: inp"):
        compare(
            save_proto(reference, tmp_path / "a.onnx"), save_proto(candidate, tmp_path / "b.onnx")
        )


def test_a_candidate_whose_outputs_differ_in_name_or_shape_is_one_clear_error(tmp_path):
    import onnx

    from onnx_shrink.errors import CandidateFailedError

    renamed = onnx.load(str(digits.MODEL_PATH))
    old = renamed.graph.output[0].name
    for node in renamed.graph.node:
        node.output[:] = ["scores" if o == old else o for o in node.output]
    renamed.graph.output[0].name = "scores"
    with pytest.raises(CandidateFailedError, match="has no output 'logits'.*its outputs: scores"):
        compare(digits.MODEL_PATH, save_proto(renamed, tmp_path / "renamed.onnx"))
    wider = parse(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) '
        "{ y = Identity(x) }"
    )
    padded = parse(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 5] y) '
        "{ pads = Constant <value_ints = [0, 0, 0, 1]> () \n y = Pad(x, pads) }"
    )
    data = {"x": np.ones((2, 4), np.float32)}
    with pytest.raises(CandidateFailedError, match=r"output 'y': the candidate's shape \(2, 5\)"):
        compare(
            save_proto(wider, tmp_path / "a.onnx"), save_proto(padded, tmp_path / "b.onnx"), data
        )


def test_a_reader_serves_the_numerics_and_the_layers(tmp_path):
    images = np.load(digits.TEST_DATA_PATH)["image"][:20]

    class Reader:
        def __init__(self):
            self.feeds = iter({"image": images[i : i + 5]} for i in range(0, 20, 5))

        def get_next(self):
            return next(self.feeds, None)

    report = check(digits.MODEL_PATH, digits.MODEL_PATH, Reader(), layers=True, latency_runs=2)
    assert report.numeric.samples == 20 and report.layers is not None
    assert report.latency is not None


def _gated(scale: float, outer: bool = False):
    """y = If(sum(x) > 100, then: x @ w * scale, else: x): a second stage that runs only on
    some samples (openWakeWord's verifier after its detector); ``outer``: ``w`` is the main
    graph's initializer, which the branch reads (as hey_jarvis's verifier weights are)."""
    import onnx
    import onnx.helper as oh

    from onnx_shrink.compiler import io

    F = onnx.TensorProto.FLOAT
    w = oh.make_tensor("w", F, [4, 4], (np.eye(4) * scale).astype(np.float32).ravel().tolist())
    then = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["t"])],
        "then",
        [],
        [oh.make_tensor_value_info("t", F, ["N", 4])],
        [] if outer else [w],
    )
    other = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [oh.make_tensor_value_info("e", F, ["N", 4])],
    )
    limit = oh.make_tensor("limit", F, [], [100.0])
    graph = oh.make_graph(
        [
            oh.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            oh.make_node("Greater", ["total", "limit"], ["gate"]),
            oh.make_node("If", ["gate"], ["y"], name="stage2", then_branch=then, else_branch=other),
        ],
        "g",
        [oh.make_tensor_value_info("x", F, ["N", 4])],
        [oh.make_tensor_value_info("y", F, ["N", 4])],
        [limit, w] if outer else [limit],
    )
    return io.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8))


def test_a_rewritten_branch_no_sample_takes_is_said_to_be_unchecked():
    """openWakeWord's hey_jarvis: prune rewrote the verifier in an If's then-branch; on data
    without the wake word the check read cosine 0.995 (0.888 through that branch) and said
    nothing of the branch it never ran."""
    quiet = {"x": np.ones((6, 4), np.float32)}
    loud = {"x": np.full((6, 4), 10.0, np.float32)}
    report = compare(_gated(1.0), _gated(0.5), quiet)
    (line,) = report.untested_branches
    assert "If 'stage2': its then_branch (1 nodes)" in line and "never true" in line
    assert report.outputs[0].max_abs_error == 0  # the else branch: nothing to see
    both = compare(_gated(1.0), _gated(0.5), {"x": np.concatenate([quiet["x"], loud["x"]])})
    assert both.untested_branches == ()
    assert compare(_gated(1.0), _gated(1.0), quiet).untested_branches == ()  # not rewritten
    # A cleanup is no rewrite: fold strips doc strings and exporters' stack traces.
    traced = _gated(1.0)
    branch = traced.graph.node(2).attributes["then_branch"].as_graph()
    branch.node(0).doc_string = "File model.py, line 12"
    branch.node(0).metadata_props["pkg.torch.onnx.stack_trace"] = "model.py:12"
    assert compare(traced, _gated(1.0), quiet).untested_branches == ()
    # Found on hey_jarvis: prune alone zeroed the verifier's weights, the main graph's
    # initializers, and the branch's own bytes stayed the same: nothing was said.
    (line,) = compare(_gated(1.0, outer=True), _gated(0.5, outer=True), quiet).untested_branches
    assert "If 'stage2': its then_branch (1 nodes)" in line
    assert compare(_gated(1.0, outer=True), _gated(1.0, outer=True), quiet).untested_branches == ()
    from onnx_shrink.runtime_check.report import html_report

    page = html_report(check=check(_gated(1.0), _gated(0.5), quiet, latency_runs=0))
    assert "Not checked: If &#x27;stage2&#x27;: its then_branch" in page


ONE_AT_A_TIME = """
<ir_version: 8, opset_import: ["" : 17]>
one (float[N, 4] x) => (float[1, 3] y) {
    shape = Constant <value = int64[2] {1, 4}> ()
    row = Reshape (x, shape)
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    y = MatMul (row, w)
}
"""
"""A dynamic batch axis declared, batch 1 written into a Reshape (khmersm's torch export)."""


def test_a_model_that_takes_one_sample_a_run_is_checked_one_sample_at_a_time(
    tmp_path, caplog, run_cli
):
    """Samples on axis 0 fill batches the model fails on: the check runs every sample alone
    (as calibration does), says so once, and counts every sample; only the reference's
    failure does that (the candidate failing where the reference ran is broken)."""
    model = save_proto(parse(ONE_AT_A_TIME), tmp_path / "one.onnx")
    np.savez(tmp_path / "rows.npz", x=np.arange(32, dtype=np.float32).reshape(8, 4))
    with caplog.at_level("WARNING"):
        report = compare(model, model, tmp_path / "rows.npz")
    assert report.samples == 8 and report.passed
    assert caplog.text.count("running every sample alone") == 1
    whole = check(model, model, tmp_path / "rows.npz", latency_runs=3)  # `onnx-shrink check`
    assert whole.latency is not None and whole.latency.reference.batch == 1  # the sample run
    run = run_cli(
        model, "--passes", "fold", "--data", tmp_path / "rows.npz", "--report", tmp_path / "r.json"
    )
    assert run.code == 0, run.err
    assert run.err.count("failed on 8 samples in one run") == 1
    assert '"samples": 8' in (tmp_path / "r.json").read_text()
    # Calibration's passes over the data and the check each find it: one warning says it.
    quant = ("--passes", "fold,quant", "--set", "quant.calibration=entropy", "--data")
    run = run_cli(model, *quant, tmp_path / "rows.npz", "--calibration", tmp_path / "rows.npz")
    assert run.code == 0, run.err
    assert run.err.count("samples in one run") == 1, run.err


FRAMES = """
<ir_version: 8, opset_import: ["" : 17]>
frames (float[T] x) => (float[N, 8] y) {
    shape = Constant <value = int64[2] {-1, 8}> ()
    rows = Reshape (x, shape)
    w = Constant <value = float[8, 8] {
        1, 0, 0, 0, 0, 0, 0, 0,  0, 1, 0, 0, 0, 0, 0, 0,  0, 0, 1, 0, 0, 0, 0, 0,
        0, 0, 0, 1, 0, 0, 0, 0,  0, 0, 0, 0, 1, 0, 0, 0,  0, 0, 0, 0, 0, 1, 0, 0,
        0, 0, 0, 0, 0, 0, 1, 0,  0, 0, 0, 0, 0, 0, 0, 2}> ()
    y = MatMul (rows, w)
}
"""
"""No batch axis: [T] values read as frames of 8 (a row of x alone cannot be reshaped)."""


def test_a_readers_feeds_for_a_model_without_a_batch_axis_are_whole_samples(tmp_path, caplog):
    """An onnxruntime CalibrationDataReader hands over whole feeds: where the model runs a
    feed but not one row of it, each feed is one sample, never cut (calibration cut them
    into 1-element samples the model refused: exit 2 blaming the data)."""
    from onnx_shrink import shrink

    model = save_proto(parse(FRAMES), tmp_path / "frames.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(64).astype(np.float32)} for _ in range(4)]

    class Reader:  # onnxruntime.quantization.CalibrationDataReader's protocol
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    with caplog.at_level("WARNING"):
        result = shrink(model, passes="quant", data=Reader(), output=tmp_path / "q.onnx")
    assert "first axis is no batch axis" in caplog.text
    assert result.verification is not None
    assert result.verification.numeric.samples == 4  # one per feed, not 256 values
    assert result.verification.latency.reference.batch == 1


def test_a_readers_joined_feeds_run_one_sample_at_a_time_and_the_reader_is_read_once(
    tmp_path,
):
    """The one-sample-a-run fallback over a one-shot reader: calibration and the check both
    read it (spilled once), each sample alone."""
    from onnx_shrink import shrink

    model = save_proto(parse(ONE_AT_A_TIME), tmp_path / "one.onnx")
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)

    class Reader:
        def __init__(self):
            self.left = iter([{"x": rows[:4]}, {"x": rows[4:]}])

        def get_next(self):
            return next(self.left, None)

    result = shrink(model, passes="quant", data=Reader(), output=tmp_path / "q.onnx")
    assert result.verification is not None
    assert result.verification.numeric.samples == 8


def test_a_candidate_quantizing_activations_at_run_time_is_checked_one_sample_a_run(tmp_path):
    """DynamicQuantizeMatMul takes one activation scale per run: in a run of 8 samples, one
    loud sample coarsens the others' grids. The check's figures are each sample's own."""
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as onh
    import onnxruntime as ort

    from onnx_shrink.compiler import io
    from onnx_shrink.passes.quant.dynamic import QuantDynamicPass

    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [onh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    reference = save_proto(proto, tmp_path / "ref.onnx")
    candidate = tmp_path / "dyn.onnx"
    io.save(QuantDynamicPass(min_weight_elements=0)(io.load(proto)).model, candidate)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[3] *= 100  # one loud sample
    np.savez(tmp_path / "x.npz", x=x)

    def outputs(path, runs):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"x": part})[0] for part in runs])

    alone, joined = [x[i : i + 1] for i in range(8)], [x]
    want = np.abs(outputs(reference, alone) - outputs(candidate, alone)).mean()
    mixed = np.abs(outputs(reference, joined) - outputs(candidate, joined)).mean()
    assert mixed > 1.5 * want  # the premise: joined runs change the figure
    report = compare(reference, candidate, tmp_path / "x.npz")
    assert report.samples == 8
    assert report.outputs[0].mean_abs_error == pytest.approx(want, rel=1e-4)


def test_the_latency_stops_at_its_budget_after_the_fewest_pairs_and_not_without_one(caplog):
    # A budget of 0 s is spent by the first pair: the timing stops after MIN_TIMED_PAIRS.
    caplog.set_level("INFO", logger="onnx_shrink")
    budget = check(digits.MODEL_PATH, digits.MODEL_PATH, DATA, latency_runs=12, latency_seconds=0)
    assert budget.latency.reference.runs == budget.latency.candidate.runs == MIN_TIMED_PAIRS
    assert f"latency: {MIN_TIMED_PAIRS} of 12 runs of each model timed" in caplog.text
    assert budget.latency.pairs_asked == 12
    ratio_cell = str(console.speed_table(budget).columns[3]._cells[0])
    assert ratio_cell.endswith(f"x paired, {MIN_TIMED_PAIRS} of 12 pairs (time budget)")
    every = check(digits.MODEL_PATH, digits.MODEL_PATH, DATA, latency_runs=12, latency_seconds=None)
    assert every.latency.reference.runs == every.latency.candidate.runs == 12
    assert str(console.speed_table(every).columns[3]._cells[0]).endswith("x paired")
    fewer = check(digits.MODEL_PATH, digits.MODEL_PATH, DATA, latency_runs=3, latency_seconds=0)
    assert fewer.latency.reference.runs == 3  # fewer asked than the fewest: what was asked


def test_the_check_reports_each_phase_as_it_runs():
    reports = []
    check(
        digits.MODEL_PATH,
        digits.MODEL_PATH,
        DATA,
        layers=True,
        latency_runs=6,
        latency_seconds=None,
        progress=lambda phase, done, total=None: reports.append((phase, done, total)),
    )
    phases = list(dict.fromkeys(phase for phase, _, _ in reports))
    assert phases[:4] == [
        progress_mod.CHECK_LOAD,
        progress_mod.CHECK_OUTPUTS,
        progress_mod.CHECK_LAYERS,
        progress_mod.CHECK_LATENCY,
    ]
    # Then the profile, where the model against itself happened to read slower.
    assert phases[4:] in ([], [progress_mod.CHECK_PROFILE])
    outputs = [(done, total) for phase, done, total in reports if phase == phases[1]]
    assert outputs[0] == (0, 450) and outputs[-1] == (450, 450) and len(outputs) > 2
    assert [r[1:] for r in reports if r[0] == phases[3]] == [(i, 6) for i in range(1, 7)]


def test_the_checks_sessions_stop_spinning_between_the_turns_they_take(monkeypatch):
    """The reference and the candidate run in turn (their runs, then latency pairs, then the
    layers' sessions): each stops its threads spinning when a run returns, or the idle one
    slows the other (two copies of a 12 ms model read 0.80-0.99x)."""
    made: list[bool] = []
    create = sessions.create_session

    def recording(*args, **kwargs):
        # Not the profile's (op_time): it runs only where noise or a slower candidate gives
        # a "slower" verdict, which two copies of one model can read on a loaded machine.
        if "profile_prefix" not in kwargs:
            made.append(kwargs.get("stop_spinning", False))
        return create(*args, **kwargs)

    monkeypatch.setattr(sessions, "create_session", recording)
    check(digits.MODEL_PATH, digits.MODEL_PATH, DATA, layers=True, latency_runs=5)
    assert made == [True] * 4


def _three_outputs(base: str) -> str:
    """Class scores, a time series and an embedding, all ``[N, 8]`` on 8-wide inputs, of
    ``base(x)``."""
    return f"""
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, T] x) => (float[N, 8] scores, float[N, T] series, float[N, 8] embedding) {{
  shape = Constant <value = int64[2] {{-1, 8}}> ()
  axes = Constant <value = int64[1] {{1}}> ()
  b = {base} (x)
  scores = Reshape (b, shape)
  series = Relu (b)
  norm = ReduceL2 <keepdims = 1> (scores, axes)
  embedding = Div (scores, norm)
}}
"""


def test_top1_agreement_is_measured_on_class_scores_only(tmp_path):
    # swift_f0's pitch [1, frames] and a sentence embedding showed a "top-1 agree" that named
    # no class: only a fixed class axis not ending in a normalization gets one.
    reference = save_proto(parse(_three_outputs("Identity")), tmp_path / "ref.onnx")
    candidate = save_proto(parse(_three_outputs("Neg")), tmp_path / "cand.onnx")
    x = np.arange(32, dtype=np.float32).reshape(4, 8) + 1
    np.savez(tmp_path / "x.npz", x=x)
    report = compare(reference, candidate, tmp_path / "x.npz")
    top1 = {out.name: out.top1_agreement for out in report.outputs}
    assert top1 == {"scores": 0.0, "series": None, "embedding": None}


def _identity(declared: str) -> str:
    return (
        f'<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float{declared} y) '
        "{ y = Identity(x) }"
    )


def test_a_candidate_declaring_an_output_shape_its_runs_contradict_is_broken(tmp_path):
    """The numbers compare equal, but what reads the declaration (TensorRT, a runtime sizing
    its buffers) breaks: a pass that wrote it broke the candidate."""
    data = {"x": np.ones((2, 4), np.float32)}
    reference = save_proto(parse(_identity("[N, 4]")), tmp_path / "r.onnx")
    for declared in ("[N, 3]", "[N, 4, 1]", "[2, 4, 1]", ""):  # "": a scalar
        candidate = save_proto(parse(_identity(declared)), tmp_path / "c.onnx")
        with pytest.raises(CandidateFailedError, match=r"declares output 'y' with shape \["):
            compare(reference, candidate, data)
    for declared in ("[N, 4]", "[2, 4]", "[M, K]"):  # the run fits these
        candidate = save_proto(parse(_identity(declared)), tmp_path / "c.onnx")
        assert compare(reference, candidate, data).passed
    assert not declared_outputs.contradicts(None, (2, 4))  # no shape declared: any rank


def test_an_output_declaration_the_reference_gets_wrong_too_is_a_warning(tmp_path, caplog):
    data = {"x": np.ones((2, 4), np.float32)}
    wrong = save_proto(parse(_identity("[N, 3]")), tmp_path / "r.onnx")
    with caplog.at_level(logging.WARNING):
        assert compare(wrong, wrong, data).passed
        # quant.max_error's measurements compare "reference" and "candidate" before the check
        # names their files: one fact, said once a run.
        copy = save_proto(parse(_identity("[N, 3]")), tmp_path / "copy.onnx")
        assert compare(copy, copy, data).passed
    assert "declares output 'y' with shape ['N', 3] but computes [2, 4]" in caplog.text
    assert caplog.text.count("declares output 'y'") == 1


def test_a_declaration_the_input_got_wrong_is_no_passs_fault_whatever_its_dims_are_called(
    tmp_path, caplog
):
    """The wrong 3 came with the reference: a candidate that names its batch dim otherwise
    (or gives -1 for a dim) keeps that declaration, warned of, not broken."""
    data = {"x": np.ones((2, 4), np.float32)}
    reference = save_proto(parse(_identity("[N, 3]")), tmp_path / "r.onnx")
    renamed = save_proto(parse(_identity("[batch, 3]")), tmp_path / "c.onnx")
    with caplog.at_level(logging.WARNING):
        assert compare(reference, renamed, data).passed
    assert "and so does" in caplog.text
    unsized = parse(_identity("[M, 4]"))
    unsized.graph.output[0].type.tensor_type.shape.dim[1].dim_value = -1
    assert compare(reference, save_proto(unsized, tmp_path / "u.onnx"), data).passed


def test_a_recurrent_state_output_gets_no_top1_agreement(tmp_path):
    # g2p-id's LSTM encoder returns its hidden state [N, 256]; in float16 it read "top-1 agree
    # 41.67%" beside cosine 1.000000, since rounding tied saturated values and argmax takes the
    # first. A state names no class; the logits beside it still get top-1.
    rng = np.random.default_rng(20261206)
    weights = {
        "w": rng.standard_normal((1, 32, 4)).astype(np.float32),
        "r": rng.standard_normal((1, 32, 8)).astype(np.float32),
        "head": rng.standard_normal((8, 5)).astype(np.float32),
    }
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[T, N, 4] x) => (float[N, 8] state, float[N, 5] logits) {
  axes = Constant <value = int64[1] {0}> ()
  y, h = LSTM <hidden_size = 8> (x, w, r)
  state = Squeeze (h, axes)
  logits = MatMul (state, head)
}
"""
    model = onnx.parser.parse_model(text)
    for name, array in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)
    reference = save_proto(model, tmp_path / "ref.onnx")
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    report = compare(reference, reference, tmp_path / "x.npz")
    top1 = {out.name: out.top1_agreement for out in report.outputs}
    assert top1 == {"state": None, "logits": 1.0}
