"""``shrink`` inside an export pipeline: the model and data forms it takes, and the errors it
raises, as its docstring states them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from models import digits
from onnx_shrink.compiler import io
from tests.helpers import digits_images, make_model


def test_a_model_given_as_bytes_is_taken_and_other_objects_are_a_bad_model_error():
    result = onnx_shrink.shrink(digits.MODEL_PATH.read_bytes(), "fold", check=False)
    assert result.model.graph.outputs
    for bad in (None, 42):
        with pytest.raises(onnx_shrink.BadModelError, match="expected a path, bytes"):
            onnx_shrink.shrink(bad, "fold", check=False)


def test_a_model_proto_whose_weights_are_external_and_not_loaded_is_a_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    model = onnx.load(str(digits.MODEL_PATH))
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0)
    unloaded = onnx.load(str(path), load_external_data=False)
    with pytest.raises(onnx_shrink.BadModelError, match="external file"):
        onnx_shrink.shrink(unloaded, "fold", check=False)


def test_two_sources_for_the_check_are_refused_not_one_silently_dropped():
    check = onnx_shrink.CheckOptions(data=digits.TEST_DATA_PATH)
    with pytest.raises(onnx_shrink.ShrinkError, match="two sources for the check"):
        onnx_shrink.shrink(digits.MODEL_PATH, "fold", data={"image": digits_images()}, check=check)


def test_a_result_that_fails_its_check_is_kept_on_the_error():
    # bfloat16 has no CPU kernels: the check cannot run the result, which output=None would
    # otherwise lose; the unchecked result on the error keeps the run's warnings (fp16's
    # nodes kept float32).
    with pytest.raises(onnx_shrink.CandidateFailedError) as caught:
        onnx_shrink.shrink(
            digits.MODEL_PATH,
            "fold,fp16",
            sets="fp16.dtype=bfloat16",
            data={"image": digits_images()},
        )
    kept = caught.value.model
    assert any(n.op_type == "Cast" for n in kept.graph)
    assert io.to_bytes(kept)  # whole, serializable
    assert any(w.startswith("warning: fp16: ") for w in caught.value.result.warnings)


class _ShapelessOutput(ir.passes.InPlacePass):
    """A pass whose result onnx.checker rejects: its graph output has no shape."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.outputs[0].shape = None
        return ir.passes.PassResult(model, True)


def test_a_result_onnx_checker_rejects_is_said_saved_and_unchecked(tmp_path):
    """PP-OCRv5 rec's quant result lost its output's shape (an opset conversion): the check
    stopped at exit 2 as if the input were bad, and said nothing of the file it had saved."""
    out = tmp_path / "shapeless.onnx"
    with pytest.raises(onnx_shrink.CandidateFailedError) as caught:
        onnx_shrink.shrink(
            digits.MODEL_PATH, [_ShapelessOutput()], output=out, data={"image": digits_images()}
        )
    message = str(caught.value)
    assert f"{out}: onnx.checker rejects the model" in message
    assert "the candidate is broken" in message and f"saved, unchecked: {out}" in message
    assert caught.value.exit_code == 3 and caught.value.result.output_path == out
    with pytest.raises(onnx_shrink.CandidateFailedError, match="^the candidate: onnx.checker"):
        onnx_shrink.shrink(digits.MODEL_PATH, [_ShapelessOutput()], data=digits.TEST_DATA_PATH)


def test_lists_and_keys_the_model_has_no_input_for_are_taken_from_dicts_and_readers():
    rows = digits_images(8)

    class Reader:
        def __init__(self) -> None:
            self.left = list(rows)

        def get_next(self):
            if not self.left:
                return None
            return {"image": self.left.pop(0)[np.newaxis].tolist(), "token_type_ids": [0]}

    expected = onnx_shrink.shrink(
        digits.MODEL_PATH, "quant", calibration={"image": rows}, check=False
    )
    for calibration in ({"image": rows.tolist(), "extra": [1, 2]}, Reader()):
        got = onnx_shrink.shrink(digits.MODEL_PATH, "quant", calibration=calibration, check=False)
        assert io.to_bytes(got.model) == io.to_bytes(expected.model)


def test_input_shapes_may_be_given_as_text_as_on_the_command_line():
    as_text = onnx_shrink.shrink(digits.MODEL_PATH, "quant", input_shapes={"image": "2x1x8x8"})
    as_dims = onnx_shrink.shrink(digits.MODEL_PATH, "quant", input_shapes={"image": (2, 1, 8, 8)})
    assert io.to_bytes(as_text.model) == io.to_bytes(as_dims.model)
    with pytest.raises(onnx_shrink.DataError, match="NAME=1x128"):
        onnx_shrink.shrink(digits.MODEL_PATH, "fold", input_shapes={"image": "2 by 8"})


@pytest.mark.parametrize("dims", [[-1, 1, 8, 8], [0, 1, 8, 8], [1.5, 1, 8, 8]])
def test_input_shapes_the_command_line_refuses_are_refused_here_too(dims):
    with pytest.raises(onnx_shrink.DataError, match="dims"):
        onnx_shrink.shrink(digits.MODEL_PATH, "fold", input_shapes={"image": dims})
    with pytest.raises(onnx_shrink.DataError, match="dims"):
        onnx_shrink.CheckOptions(input_shapes={"image": dims})


def test_latency_runs_below_zero_are_refused_as_the_command_lines_runs_are():
    with pytest.raises(onnx_shrink.ShrinkError, match="latency_runs must be at least 0, not -3"):
        onnx_shrink.CheckOptions(latency_runs=-3)
    assert onnx_shrink.CheckOptions(latency_runs=0).latency_runs == 0  # 0: no latency


def test_the_total_time_is_the_compiles_and_the_check_gives_its_own():
    """The summary's total read the whole run: PP-OCRv4 rec's passes and calibration took
    5.2 s and its total said 114 s, the check's latency and layers included."""
    from onnx_shrink import console
    from onnx_shrink.runtime_check import report

    check = onnx_shrink.CheckOptions(data={"image": digits_images()}, layers=True, latency_runs=20)
    result = onnx_shrink.shrink(digits.MODEL_PATH, "fold", check=check)
    check_seconds = result.verification.seconds
    assert 0 < result.compile_seconds and 0 < check_seconds
    assert result.compile_seconds + check_seconds <= result.seconds
    assert result.to_dict()["compile_seconds"] == result.compile_seconds
    table = console.summary_table(result)
    assert table.columns[1]._cells[-1] == f"{result.compile_seconds:.2f}s"
    assert f"{check_seconds:.1f}s" in str(
        console.numeric_table(result.verification.numeric, "cpu", check_seconds).title
    )
    page = report.html_report(shrink=result, check=result.verification)
    assert f"in {result.compile_seconds:.2f} s" in page


def test_a_data_aware_pass_that_changes_nothing_leaves_the_model_as_it_was():
    """quant converts an old model's opset and infers its types before it knows whether it
    will quantize: on an already-int8 model it said "no change" and wrote opset 13 and 237
    value_info entries (ddddocr 1.6.1's common_old.onnx, 9.5 KB larger)."""
    text = """
    <ir_version: 7, opset_import: ["" : 12]>
    g (float[N, 4, 8] a, float[N, 8, 3] b) => (float[N, 4, 3] y) {
      t = Relu(a)
      y = MatMul(t, b)
    }
    """
    from tests.helpers import parse

    rng = np.random.default_rng(0)
    calibration = {
        "a": rng.standard_normal((4, 4, 8)).astype(np.float32),
        "b": rng.standard_normal((4, 8, 3)).astype(np.float32),
    }
    result = onnx_shrink.shrink(parse(text), "quant", check=False, calibration=calibration)
    assert not result.steps[0].modified  # activation x activation MatMuls stay float
    assert result.model.opset_imports[""] == 12
    assert io.to_bytes(result.model) == io.to_bytes(io.load(parse(text)))


def test_a_check_on_the_data_a_pass_fit_weights_to_is_said_to_be_in_sample(caplog, tmp_path):
    """lowrank fit to 64 crops of a 1152-wide layer read error 4.5e-6 on those crops and
    0.062 on others; the check gave only the first."""
    import logging
    import types

    from onnx_shrink import api
    from onnx_shrink.passes.lowrank import LowRankPass
    from onnx_shrink.passes.quant.static import QuantPass

    fitted = [LowRankPass(), QuantPass()]
    steps = [types.SimpleNamespace(modified=True, calibration_samples=64)] * 2
    path = tmp_path / "d.npz"
    cases = [(None, path, True), (path, path, True), (str(path), path, True)]
    cases += [(tmp_path / "other.npz", path, False), (None, None, False)]
    for calibration, check_data, warned in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            api._warn_in_sample(steps, fitted, calibration, check_data)
        assert ("calibration data, which lowrank fit" in caplog.text) == warned
    # No data at all: both the same seeded synthetic inputs (PP-OCRv6 rec's lowrank read
    # cosine 0.999999 there, 0.70 on rendered lines).
    assert "the check runs on the synthetic inputs lowrank fit weights to" in caplog.text
    assert "can be far better there than on real inputs" in caplog.text  # read "better better"
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # quant alone calibrates ranges, fits no weights
        api._warn_in_sample(steps[1:], fitted[1:], None, path)
    assert not caplog.text
    with caplog.at_level(logging.WARNING):  # bias correction fits Conv biases to the data
        api._warn_in_sample(steps[1:], [QuantPass(bias_correction=True)], None, path)
    assert "calibration data, which quant fit weights to" in caplog.text


def test_a_large_error_is_said_under_the_check_table():
    """Without tolerances the verdict says "measured": openWakeWord's mel filterbank
    quantized kept 6.7 dB SNR (cosine 0.89) and read like any other result."""
    import dataclasses
    import math

    from onnx_shrink import console

    check = onnx_shrink.CheckOptions(data={"image": digits_images()}, latency_runs=0)
    numeric = onnx_shrink.shrink(digits.MODEL_PATH, "fold", check=check).verification.numeric
    assert console.numeric_table(numeric, "cpu").caption is None  # lossless: nothing to say
    output = dataclasses.replace(numeric.outputs[0], snr_db=6.68, cosine=0.8915)
    lossy = dataclasses.replace(numeric, outputs=(output,))
    caption = str(console.numeric_table(lossy, "cpu").caption)
    assert f"'{output.name}' keeps 6.7 dB SNR (cosine 0.8915)" in caption
    assert "--sensitivity" in caption
    # An all-zero reference (a mask) gives -inf dB at any difference: nothing to say.
    zero = dataclasses.replace(output, snr_db=-math.inf, cosine=0.0, reference_max_abs=0.0)
    assert (
        console.numeric_table(dataclasses.replace(numeric, outputs=(zero,)), "cpu").caption is None
    )


def test_a_large_error_is_said_in_the_report_files_too():
    """The HTML and JSON reports of a run whose check found a large error carry the note the
    console prints: openWakeWord's mel spectrogram quantized (5.8 dB) had "warnings": [] and
    an HTML page that read like any other."""
    import dataclasses

    from onnx_shrink.runtime_check import report

    check = onnx_shrink.CheckOptions(data={"image": digits_images()}, latency_runs=0)
    result = onnx_shrink.shrink(digits.MODEL_PATH, "fold", check=check)
    assert result.to_dict()["verification"]["notes"] == []  # lossless: nothing to say
    assert "large error" not in report.html_report(shrink=result)
    numeric = result.verification.numeric
    output = dataclasses.replace(numeric.outputs[0], snr_db=5.8, cosine=0.9206)
    lossy = dataclasses.replace(numeric, outputs=(output,))
    result = dataclasses.replace(
        result, verification=dataclasses.replace(result.verification, numeric=lossy)
    )
    (note,) = result.to_dict()["verification"]["notes"]
    assert note.startswith(f"large error: '{output.name}' keeps 5.8 dB SNR (cosine 0.9206)")
    assert note.endswith("--layers shows where the error first jumps")  # fold: no fix
    assert f"<li>Large error: &#x27;{output.name}&#x27; keeps 5.8 dB SNR" in report.html_report(
        shrink=result
    )


def test_a_model_without_a_batch_axis_counts_each_whole_sample_and_runs_it_as_one():
    """madmom's beat models take [frames, features]: with samples given whole (N x T x F),
    the frames axis was taken for a batch, so MACs read one frame's (88.25k of 17.65M) and
    the latency row "batch 200"."""
    from tests.helpers import parse

    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[T, 16] frames) => (float[T, 8] y) {
          y = MatMul(frames, w)
        }
        """.replace("{", "<float[16, 8] w = {" + ", ".join(["0.5"] * 128) + "}> {", 1)
    )
    frames = np.random.default_rng(0).normal(size=(4, 50, 16)).astype(np.float32)
    check = onnx_shrink.CheckOptions(data={"frames": frames}, latency_runs=3)
    result = onnx_shrink.shrink(proto, "fold", check=check)
    assert result.steps[0].before.macs == 50 * 16 * 8
    assert result.steps[0].before.nodes_without_macs == 0
    assert result.verification.latency.reference.batch == 1
    assert result.verification.numeric.samples == 4


@pytest.mark.parametrize("passes", ["fold,quant-dynamic", "fold,lowrank"])
def test_a_model_without_node_names_comes_out_without_any_name_made_from_the_ones_given(
    tmp_path, passes
):
    """Nodes are named at load (``Gemm_11``) for options and reports. Found in review: the
    replacements the passes made carried names derived from those (``Gemm_11_quant``)."""
    from models import digits

    proto = onnx.load(digits.MODEL_PATH)
    for node in proto.graph.node:
        node.ClearField("name")
    path = tmp_path / "unnamed.onnx"
    onnx.save(proto, path)
    result = onnx_shrink.shrink(path, passes, check=False, calibration=digits.TEST_DATA_PATH)
    assert result.steps[-1].modified
    assert [n.name for n in result.model.graph if n.name] == []


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
def test_a_latency_budget_below_zero_or_not_a_number_is_refused(seconds):
    from onnx_shrink.api import CheckOptions
    from onnx_shrink.errors import ShrinkError

    with pytest.raises(ShrinkError, match="latency_seconds"):
        CheckOptions(latency_seconds=seconds)


def _conv_norm(shared: bool = False):
    """Conv -> BatchNormalization -> Relu -> Conv; ``shared``: a graph output reads the first
    Conv's output too, so fold cannot fuse the BatchNormalization into it."""
    rng = np.random.default_rng(0)
    f = onnx.TensorProto.FLOAT
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        oh.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="norm"),
        oh.make_node("Relu", ["n"], ["r"], name="relu"),
        oh.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    norm = zip("sbmv", (1.5, 0.1, 0.2, 2.0), strict=True)  # scale, bias, mean, variance
    channels = {name: np.full(4, value, np.float32) for name, value in norm}
    constants = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
        **channels,
    }
    inputs = [oh.make_tensor_value_info("x", f, ["N", 3, 8, 8])]
    outputs = [oh.make_tensor_value_info("y", f, ["N", 2, 8, 8])]
    if shared:
        outputs.append(oh.make_tensor_value_info("c", f, ["N", 4, 8, 8]))
    return make_model(nodes, inputs, outputs, constants, opset=17)


CALIBRATION = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}


def test_the_result_keeps_what_the_run_warned_of():
    """A pipeline reading the result (not a console) learns what the run said: here quant
    alone on a Conv -> BatchNormalization model, which fold first would have folded, and the
    synthetic data calibration fell back to."""
    model = _conv_norm()
    alone = onnx_shrink.shrink(model, "quant", check=False)
    said = "\n".join(alone.warnings)
    assert "1 BatchNormalization node(s) after quantized Convs stay float" in said
    assert "'norm'" in said and "fold,quant" in said
    assert "synthetic" in said
    assert alone.to_dict()["warnings"] == list(alone.warnings)
    folded = onnx_shrink.shrink(model, "fold,quant", check=False, calibration=CALIBRATION)
    # Its 124 weights take fewer bytes than their scales and Q/DQ nodes: that alone is said.
    (grew,) = folded.warnings
    assert "quant: the result takes more bytes than its input" in grew


def test_no_fold_first_is_asked_where_fold_cannot_fuse_the_normalization():
    result = onnx_shrink.shrink(
        _conv_norm(shared=True), "fold,quant", check=False, calibration=CALIBRATION
    )
    assert not any("BatchNormalization" in w for w in result.warnings), result.warnings


def test_a_caller_who_set_up_no_logging_still_sees_the_warnings(monkeypatch, capsys):
    """Python prints warnings on stderr only while no handler is attached anywhere: the
    handler that records them must not silence them."""
    import logging

    monkeypatch.setattr(logging.root, "handlers", [])
    result = onnx_shrink.shrink(_conv_norm(), "quant", check=False, calibration=CALIBRATION)
    assert result.warnings
    assert "BatchNormalization node(s) after quantized Convs" in capsys.readouterr().err


def test_progress_goes_on_through_the_check():
    """The status line read "calibrating (statistics) 32/32 samples" through PP-OCRv4 rec's
    36 s check: ``on_calibration`` hears of the check's phases too, after calibration's."""
    from onnx_shrink.runtime_check import progress

    reports = []
    onnx_shrink.shrink(
        digits.MODEL_PATH,
        "fold,quant",
        data={"image": digits_images(20)},
        check=onnx_shrink.CheckOptions(latency_runs=3, latency_seconds=None),
        on_calibration=lambda phase, done, total: reports.append((phase, done, total)),
    )
    phases = list(dict.fromkeys(phase for phase, _, _ in reports))
    if phases[-1] == progress.CHECK_PROFILE:  # the candidate read slower: where the time goes
        phases.pop()
    check = [progress.CHECK_LOAD, progress.CHECK_OUTPUTS, progress.CHECK_LATENCY]
    assert phases[-3:] == check and progress.STATISTICS in phases[:-3]
    last = {phase: (done, total) for phase, done, total in reports}
    assert last[progress.CHECK_OUTPUTS] == (20, 20) and last[progress.CHECK_LATENCY] == (3, 3)
