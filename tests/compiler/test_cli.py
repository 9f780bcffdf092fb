"""The command line end to end on the bundled digits model."""

from __future__ import annotations

import json

import onnx

from models import digits
from tests.helpers import files_in, make_model, sha256


def test_fold_on_digits_writes_model_table_accuracy_and_matching_report(digits_copy, run_cli):
    report_path = digits_copy.parent / "report.json"
    before = sha256(digits_copy)

    result = run_cli(
        digits_copy, "--passes", "fold", "--data", digits.TEST_DATA_PATH, "--report", report_path
    )

    assert result.code == 0, result.err
    output = digits_copy.with_name("digits.shrunk.onnx")
    onnx.checker.check_model(str(output))
    assert sha256(digits_copy) == before
    assert "onnx-shrink summary" in result.out and "fold" in result.out
    assert "450 samples" in result.out and "accuracy" in result.out
    report = json.loads(report_path.read_text())
    verification = report["verification"]["numeric"]
    assert verification["reference_accuracy"] >= 0.95
    assert verification["candidate_accuracy"] == verification["reference_accuracy"]
    assert f"{verification['reference_accuracy']:.2%}" in result.out
    total = report["total"]
    assert total["bytes_on_disk"] == [digits_copy.stat().st_size, output.stat().st_size]
    assert total["nodes"][1] < total["nodes"][0]
    assert report["passes"][0]["spec"] == "fold"
    assert verification["outputs"][0]["max_abs_error"] < 1e-4


def test_spec_errors_exit_2_before_the_model_is_read(tmp_path, run_cli):
    result = run_cli(tmp_path / "does-not-exist.onnx", "--passes", "fold,nope")
    assert result.code == 2
    assert "unknown pass 'nope'" in result.err
    assert files_in(tmp_path) == set()


def test_output_option_and_dump_dir_and_no_check(digits_copy, run_cli):
    out = digits_copy.parent / "small.onnx"
    dumps = digits_copy.parent / "dumps"
    result = run_cli(
        digits_copy, "--passes", "fold,fold", "-o", out, "--dump-dir", dumps, "--no-check", "-q"
    )
    assert result.code == 0, result.err
    assert result.out == ""
    assert sorted(p.name for p in dumps.iterdir()) == ["01-fold.onnx", "02-fold.onnx"]
    onnx.checker.check_model(str(out))


def test_refuses_to_overwrite_the_input(digits_copy, run_cli):
    before = sha256(digits_copy)
    result = run_cli(digits_copy, "--passes", "fold", "-o", digits_copy)
    assert result.code == 2
    assert "-o would write over the input model" in result.err
    assert sha256(digits_copy) == before


def test_refuses_an_output_whose_external_data_is_the_inputs_weights(tmp_path, run_cli):
    """in.onnx keeps its weights in out.onnx.data: saving out.onnx with external data would
    write them over (and leave in.onnx unreadable)."""
    source = tmp_path / "in.onnx"
    onnx.save(
        onnx.load(digits.MODEL_PATH),
        source,
        save_as_external_data=True,
        location="out.onnx.data",
        size_threshold=0,
    )
    before = {name: sha256(tmp_path / name) for name in ("in.onnx", "out.onnx.data")}
    out = tmp_path / "out.onnx"
    result = run_cli(source, "--passes", "fold", "-o", out, "--external-data", "yes")
    assert result.code == 2
    assert "would go to" in result.err and "holds the input model's weights" in result.err
    assert {name: sha256(tmp_path / name) for name in before} == before
    assert not out.exists()
    # Under auto a small result stays embedded: refused all the same (its size is not known
    # yet), and the line says it could go there and how to embed it.
    result = run_cli(source, "--passes", "fold", "-o", out)
    assert result.code == 2
    assert "could go (--external-data auto, past 1.8 GB)" in result.err
    assert "--external-data no" in result.err
    # Embedded, the output writes no data file: nothing of the input's is at risk.
    result = run_cli(source, "--passes", "fold", "-o", out, "--external-data", "no", "-q")
    assert result.code == 0, result.err
    assert {name: sha256(tmp_path / name) for name in before} == before


def test_list_passes_documents_every_option(run_cli):
    result = run_cli("--list-passes")
    assert result.code == 0
    for text in ("fold", "max_growth_bytes", "int", "never larger than the input"):
        assert text in result.out


def test_synthetic_check_and_input_shape(digits_copy, run_cli):
    result = run_cli(digits_copy, "--passes", "fold", "--input-shape", "image=3x1x8x8")
    assert result.code == 0, result.err
    assert "synthetic" in result.err
    assert "image=3x1x8x8" in result.out


def test_bad_input_shape_is_a_clear_error(digits_copy, run_cli):
    result = run_cli(digits_copy, "--passes", "fold", "--input-shape", "image=3x8x8")
    assert not digits_copy.with_name("digits.shrunk.onnx").exists()
    assert result.code == 2
    assert "has 3 dims, the model expects 4" in result.err
    twice = ("--input-shape", "image=1x1x8x8", "--input-shape", "image=4x1x8x8")
    result = run_cli(digits_copy, "--passes", "fold", *twice)  # the last won, silently
    assert result.code == 2 and "--input-shape gives 'image' twice" in result.err


def test_data_with_wrong_dtype_is_a_clear_error(digits_copy, tmp_path, run_cli):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 1, 8, 8), dtype=np.float64))
    before = files_in(tmp_path)
    result = run_cli(digits_copy, "--passes", "fold", "--data", bad)
    assert result.code == 2
    assert "input 'image' is float64, the model expects float32" in result.err
    assert files_in(tmp_path) == before


def test_no_check_still_calibrates_on_the_data(digits_copy, run_cli):
    """--data is the calibration data too; --no-check dropped it and quant calibrated on
    random inputs. The summary says how many samples it calibrated on."""
    result = run_cli(
        digits_copy, "--passes", "quant", "--data", digits.TEST_DATA_PATH, "--no-check"
    )
    assert result.code == 0, result.err
    assert "NO CALIBRATION DATA" not in result.err
    assert "[calibrated on 450" in result.out  # rich read the brackets as markup and dropped it


def test_input_shape_shapes_the_synthetic_calibration_inputs(digits_copy, run_cli):
    result = run_cli(digits_copy, "--passes", "quant", "--input-shape", "image=3x1x8x8")
    assert result.code == 0, result.err
    calibration = next(line for line in result.err.splitlines() if "NO CALIBRATION DATA" in line)
    assert "image=3x1x8x8" in calibration


def test_a_missing_calibration_file_is_the_only_line_and_nothing_is_done(digits_copy, run_cli):
    """It was read only at calibration: the check's synthetic-data warning came first."""
    out = digits_copy.parent / "q.onnx"
    missing = digits_copy.parent / "nope.npz"
    result = run_cli(digits_copy, "--passes", "quant", "--calibration", missing, "-o", out)
    assert result.code == 2
    assert result.err.strip() == f"onnx-shrink: error: {missing}: no such file or folder"
    assert not out.exists()


def test_phase_status_is_a_bar_of_samples_where_the_total_is_known():
    from onnx_shrink import console

    bar = console.phase_status("statistics", 8, 32, width=8)
    assert bar == "calibrating (statistics) ━━────── 8/32 samples"
    assert console.phase_status("statistics", 5, None) == ("calibrating (statistics): 5 samples...")
    assert console.phase_status("statistics", 1, None) == ("calibrating (statistics): 1 sample...")


def test_a_phase_not_of_calibration_reads_as_named_and_fits_the_terminal():
    """The statistics engine's phases, after a purpose too, read as calibration; the
    sensitivity report's runs as they are named. Given the terminal's width, the bar narrows
    (to 6 at least) so the line does not wrap."""
    from onnx_shrink import console

    assert console.phase_status("sensitivity: histograms", 2, 8, width=8) == (
        "calibrating (sensitivity: histograms) ━━────── 2/8 samples"
    )
    run = "sensitivity: 207 layers, run 3/26, about 41 s left"
    assert console.phase_status(run, 4, 8, width=8) == f"{run} ━━━━──── 4/8 samples"
    fitted = console.phase_status(run, 4, 8, columns=80)
    assert len(fitted) == 80 - 3 and fitted == f"{run} {'━' * 7}{'─' * 7} 4/8 samples"
    assert console.phase_status(run, 4, 8, columns=40) == f"{run} ━━━─── 4/8 samples"
    assert console.phase_status(run, 4, 8, columns=200) == (
        f"{run} {'━' * 12}{'─' * 12} 4/8 samples"
    )


def test_a_benchmarks_phases_count_its_timed_runs_over_the_whole_grid(tmp_path):
    """``onnx-shrink bench`` showed "benchmarking..." and nothing else, however long its grid
    of batch sizes and thread counts ran."""
    from onnx_shrink import console
    from onnx_shrink.runtime_check import bench, progress

    model = tmp_path / "relu.onnx"
    onnx.save(
        make_model(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
            {},
        ),
        model,
    )
    heard = []
    bench.benchmark(
        model,
        batch_sizes=[1, 2],
        threads=[1, 2],
        runs=3,
        warmup=0,
        memory=False,
        progress=lambda phase, done, total=None: heard.append((phase, done, total)),
    )
    timed = [done for phase, done, total in heard if phase == progress.TIMED_RUNS]
    assert {total for phase, _, total in heard if phase == progress.TIMED_RUNS} == {12}
    assert timed == sorted(timed) and timed[0] == 0 and timed[-1] == 12
    assert [phase for phase, _, _ in heard].count(progress.SESSION) == 2  # one per thread count
    assert console.phase_status(progress.TIMED_RUNS, 6, 12, width=4) == "timed runs ━━── 6/12 runs"
    assert console.phase_status(progress.SESSION_MEMORY, 0, None) == "session memory..."


def test_the_checks_phases_count_what_they_run():
    """Found from a user's seat: the check of PP-OCRv4 rec (36 s of compared samples and
    timed pairs) showed "calibrating (statistics) 32/32 samples" all along."""
    from onnx_shrink import console
    from onnx_shrink.runtime_check import progress

    assert console.phase_status(progress.CHECK_OUTPUTS, 3, 32, width=8) == (
        "check: outputs ━─────── 3/32 samples"
    )
    assert console.phase_status(progress.CHECK_LATENCY, 9, 18, width=8) == (
        "check: latency ━━━━──── 9/18 pairs"
    )
    assert console.phase_status(progress.CHECK_LOAD, 0, None) == "check: loading both models..."
    assert console.phase_status(progress.CHECK_PROFILE, 0, None) == (
        "check: where the time goes..."
    )


def test_one_sample_is_not_said_as_samples(digits_copy, run_cli, tmp_path):
    import numpy as np

    one = tmp_path / "one.npz"
    np.savez(one, image=np.load(digits.TEST_DATA_PATH)["image"][:1])
    result = run_cli(digits_copy, "--passes", "fold", "--data", one, "--runs", 2, "--layers")
    assert result.code == 0, result.err
    assert "1 sample," in result.out and "1 samples" not in result.out


def test_a_result_the_check_provider_cannot_run_is_written_and_exits_3(digits_copy, run_cli):
    """bfloat16 has no kernels on onnxruntime's CPU provider: not bad input (2), not a failed
    check (1), but a result saved unchecked."""
    out = digits_copy.parent / "bf16.onnx"
    result = run_cli(
        digits_copy, "--passes", "fold,fp16", "--set", "fp16.dtype=bfloat16", "-o", out
    )
    assert result.code == 3, result.err
    assert "saved, unchecked" in result.err and "--ep" in result.err
    onnx.checker.check_model(str(out))


def test_an_unchecked_result_still_gets_its_summary_and_reports(digits_copy, run_cli):
    """Exit 3 printed nothing on stdout and wrote neither report, though the result was
    saved and what was gained was known."""
    folder = digits_copy.parent
    result = run_cli(
        digits_copy, "--passes", "fold,fp16", "--set", "fp16.dtype=bfloat16",
        "-o", folder / "bf16.onnx", "--report", folder / "r.json", "--html", folder / "r.html",
    )  # fmt: skip
    assert result.code == 3, result.err
    assert "onnx-shrink summary" in result.out and "wrote" in result.out
    written = json.loads((folder / "r.json").read_text())
    assert written["verification"] is None and "cannot load it" in written["unchecked"]
    assert written["total"]["bytes_on_disk"][1] == (folder / "bf16.onnx").stat().st_size
    assert (folder / "r.html").stat().st_size > 0


def test_strict_stopping_at_a_broken_tolerance_exits_1_not_2(digits_copy, run_cli):
    """A broken tolerance is exit 1 (as for the final check), not 2, which says bad input."""
    out = digits_copy.parent / "small.onnx"
    sets = ("--set", "prune.sparsity=0.95", "--set", "prune.min_elements=0")
    data = ("--data", digits.TEST_DATA_PATH)
    result = run_cli(digits_copy, "--passes", "prune", *sets, *data, "--verify-each", "--strict")
    assert result.code == 1, result.err
    assert "check failed: pass 'prune" in result.err and "broke the tolerances" in result.err
    assert not out.exists()


def test_a_bug_exits_4_with_its_traceback_not_1(digits_copy, run_cli, monkeypatch):
    """Exit 1 is a broken tolerance: a script must be able to tell a crash from it."""
    from onnx_shrink import cli

    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "shrink", broken)
    result = run_cli(digits_copy, "--passes", "fold", "-o", digits_copy.parent / "o.onnx")
    assert result.code == cli.EXIT_INTERNAL == 4
    assert "Traceback" in result.err and "internal error: KeyError: 'oops'" in result.err


def test_a_pass_running_out_of_memory_exits_4_not_as_a_failed_pass(
    digits_copy, run_cli, monkeypatch
):
    from onnx_shrink.passes.fold import FoldPass

    def exhausted(self, model):
        raise MemoryError("Unable to allocate 64.0 GiB")

    monkeypatch.setattr(FoldPass, "call", exhausted)
    result = run_cli(digits_copy, "--passes", "fold", "-o", digits_copy.parent / "o.onnx")
    assert result.code == 4, result.err
    assert "out of memory: Unable to allocate 64.0 GiB" in result.err
    # Found in review: inside fold's own pass manager, onnx_ir wraps it in a PassError.
    from onnx_shrink.passes import fold

    monkeypatch.undo()
    monkeypatch.setattr(fold._DropDeadUsesPass, "call", exhausted)
    result = run_cli(digits_copy, "--passes", "fold", "-o", digits_copy.parent / "o.onnx")
    assert result.code == 4 and "out of memory" in result.err, result.err


def test_running_out_of_memory_is_one_line_and_exit_4(digits_copy, run_cli):
    shape = ("--input-shape", "image=100000000000x1x8x8")
    result = run_cli(digits_copy, "--passes", "fold", *shape, "-o", digits_copy.parent / "o.onnx")
    assert result.code == 4, result.err
    assert "out of memory" in result.err and "Traceback" not in result.err


def test_a_report_into_a_missing_folder_is_refused_before_any_work(digits_copy, run_cli):
    out = digits_copy.parent / "small.onnx"
    missing = digits_copy.parent / "missing" / "report.json"
    result = run_cli(digits_copy, "--passes", "fold", "-o", out, "--report", missing)
    assert result.code == 2
    assert "the --report folder does not exist" in result.err
    assert not out.exists()


def test_a_model_that_cannot_be_written_is_one_line_and_exit_2(digits_copy, run_cli, monkeypatch):
    """A full disk (or a folder gone read-only) while saving: no traceback, no leftovers."""
    import errno

    from onnx_shrink.compiler import io

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full_disk)
    out = digits_copy.parent / "small.onnx"
    result = run_cli(digits_copy, "--passes", "fold", "-o", out, "--no-check")
    assert result.code == 2
    assert "cannot write the model (No space left on device)" in result.err
    assert files_in(digits_copy.parent) == {digits_copy.name}


def test_flags_that_would_do_nothing_are_errors_before_any_work(digits_copy, run_cli):
    parent = digits_copy.parent
    result = run_cli(digits_copy, "--passes", "fold", "--no-check", "--verify-each", "--runs", 3)
    assert result.code == 2
    assert "--no-check skips the check, so --verify-each, --runs would do nothing" in result.err
    result = run_cli(digits_copy, "--passes", "fold", "--strict")
    assert result.code == 2 and "add --verify-each" in result.err
    assert files_in(parent) == {digits_copy.name}
    from onnx_shrink import cli

    bench_flags = {flag for a in cli.build_bench_parser()._actions for flag in a.option_strings}
    assert "--labels" not in bench_flags  # bench measures no accuracy: it used to ignore them


def test_labels_that_cannot_label_the_data_name_the_labels_file(digits_copy, tmp_path, run_cli):
    import numpy as np

    labels = np.load(digits.TEST_DATA_PATH)["labels"]
    np.save(tmp_path / "all.npy", labels)
    np.save(tmp_path / "short.npy", labels[:100])
    check = ("check", digits_copy, digits_copy, "-q")
    result = run_cli(*check, "--labels", tmp_path / "all.npy")
    assert result.code == 2 and "all.npy: labels without data" in result.err
    result = run_cli(*check, "--labels", tmp_path / "short.npy", "--data", digits.TEST_DATA_PATH)
    assert result.code == 2
    assert f"short.npy: 100 labels for the {len(labels)} samples of" in result.err
    result = run_cli(*check, "--labels", tmp_path / "all.npy", "--data", digits.TEST_DATA_PATH)
    assert result.code == 0, result.err


def test_labels_outside_the_classifiers_classes_are_refused_before_any_pass(
    digits_copy, tmp_path, run_cli
):
    """Labels 1-10 for 10 classes: they were scored (the 10s as misses) and the run passed."""
    import numpy as np

    arrays = np.load(digits.TEST_DATA_PATH)
    np.savez(tmp_path / "d.npz", image=arrays["image"], labels=arrays["labels"] + 1)
    output = tmp_path / "out.onnx"
    args = ("--data", tmp_path / "d.npz", "--max-accuracy-drop", "0.01", "--runs", "0")
    result = run_cli(digits_copy, "--passes", "fold", "-o", output, *args)
    assert result.code == 2 and not output.exists()
    assert "is outside [0, 10), the classes of the scored output 'logits'" in result.err
    assert "running pass" not in result.err  # refused before any work
    result = run_cli("check", digits_copy, digits_copy, *args)
    assert result.code == 2 and "is outside [0, 10)" in result.err


def test_labels_for_another_task_are_refused_only_where_accuracy_is_asked_for(
    digits_copy, tmp_path, run_cli
):
    """Found in review: labels were validated as the data was read, so data carrying
    segmentation masks could not even calibrate, and --labels could not replace them."""
    import numpy as np

    arrays = np.load(digits.TEST_DATA_PATH)
    masks = np.zeros((len(arrays["image"]), 8, 8), np.int64)
    np.savez(tmp_path / "d.npz", image=arrays["image"], labels=masks)
    np.save(tmp_path / "good.npy", arrays["labels"])
    out = ("-o", tmp_path / "out.onnx", "--runs", "0")
    data = ("--data", tmp_path / "d.npz")
    calibration = ("--calibration", data[1], "--no-check", "-o", tmp_path / "out.onnx")
    calibrated = run_cli(digits_copy, "--passes", "quant", *calibration)
    assert calibrated.code == 0, calibrated.err
    checked = run_cli(digits_copy, "--passes", "fold", *data, *out)
    assert checked.code == 0 and "accuracy is not measured" in checked.err
    replaced = run_cli(
        digits_copy, "--passes", "fold", *data, "--labels", tmp_path / "good.npy", *out
    )
    assert replaced.code == 0 and "accuracy is not measured" not in replaced.err
    assert "99.11%" in replaced.out
    asked = run_cli(digits_copy, "--passes", "fold", *data, "--max-accuracy-drop", "0.01", *out)
    assert asked.code == 2 and "labels have shape 8x8 per sample" in asked.err
    np.savez(tmp_path / "d2.npz", image=arrays["image"], labels=masks)  # a message not yet said
    each = ("--data", tmp_path / "d2.npz", "--verify-each")
    verified = run_cli(digits_copy, "--passes", "fold,quant-dynamic", *each, *out)
    assert verified.code == 0 and verified.err.count("accuracy is not measured") == 1  # not 3


def test_max_accuracy_drop_on_data_without_labels_is_refused_before_any_pass(
    digits_copy, tmp_path, run_cli
):
    """It ran every pass, rolled each back as breaking the tolerance, and exited 1."""
    import numpy as np

    np.savez(tmp_path / "nolabels.npz", image=np.load(digits.TEST_DATA_PATH)["image"][:64])
    output = tmp_path / "out.onnx"
    run = (digits_copy, "--passes", "fold,quant", "-o", output, "--runs", "0", "--verify-each")
    result = run_cli(*run, "--data", tmp_path / "nolabels.npz", "--max-accuracy-drop", "0.01")
    assert result.code == 2 and not output.exists()
    assert "--max-accuracy-drop needs labels, and " in result.err
    assert "nolabels.npz has none: add a 'labels' array" in result.err
    result = run_cli(*run, "--data", tmp_path / "nolabels.npz")  # defaults: where measurable
    assert result.code == 0, result.err


def test_no_file_the_run_writes_may_be_one_it_reads_or_another_it_writes(
    digits_copy, tmp_path, run_cli
):
    import shutil

    data = shutil.copy(digits.TEST_DATA_PATH, tmp_path / "data.npz")
    before = {p: sha256(p) for p in (digits_copy, data)}
    out = tmp_path / "out.onnx"
    cases = [
        (("check", digits_copy, digits_copy, "--report", digits_copy), "would write over"),
        ((digits_copy, "--passes", "fold", "-o", out, "--report", out), "the same file"),
        ((digits_copy, "--passes", "fold", "--data", data, "-o", data), "write over --data"),
        ((digits_copy, "--passes", "fold", "--html", out, "--report", out), "the same file"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.code == 2 and message in result.err, (args, result.err)
    assert {p: sha256(p) for p in before} == before and not out.exists()


def test_no_file_the_run_writes_may_be_a_model_s_external_weights_or_a_dump_over_a_read(
    tmp_path, run_cli
):
    # A report written over model.onnx.data destroys the model as surely as one written over
    # model.onnx; so does a dump named like the input, in the input's folder.
    from onnx_shrink.compiler import io

    model = tmp_path / "ext.onnx"
    io.save(io.load(digits.MODEL_PATH), model, external_data=True)
    weights = io.external_data_path(model)
    steps = tmp_path / "steps"
    steps.mkdir()
    dumped = steps / "01-fold.onnx"
    dumped.write_bytes(digits.MODEL_PATH.read_bytes())
    files = (model, weights, dumped)
    before = {p: sha256(p) for p in files}
    out = tmp_path / "out.onnx"
    fold = (model, "--passes", "fold", "--no-check")
    cases = [
        ((*fold, "-o", out, "--report", weights), "input model's weights"),
        ((*fold, "-o", weights), "input model's weights"),
        (("check", model, model, "--html", weights), "reference model's weights"),
        (("bench", model, "--report", weights), "input model's weights"),
        ((dumped, "--passes", "fold", "--dump-dir", steps, "-o", out), "over the input model"),
        ((*fold, "--dump-dir", steps, "-o", steps / "01-fold.onnx"), "over the result"),
        ((*fold, "--dump-dir", model, "-o", out), "dump folder is a file"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.code == 2 and message in result.err, (args, result.err)
    assert {p: sha256(p) for p in files} == before and not out.exists()


def test_the_api_refuses_to_write_the_result_over_its_data(tmp_path):
    import shutil

    import pytest

    import onnx_shrink
    from onnx_shrink.errors import ShrinkError

    data = shutil.copy(digits.TEST_DATA_PATH, tmp_path / "data.npz")
    with pytest.raises(ShrinkError, match="the result would write over the calibration data"):
        onnx_shrink.shrink(digits.MODEL_PATH, "fold", output=data, calibration=data, check=False)


def test_an_output_inside_a_file_is_named_as_such(digits_copy, run_cli):
    result = run_cli(digits_copy, "--passes", "fold", "-o", digits_copy / "x.onnx")
    assert result.code == 2 and "is a file, not a folder" in result.err


def test_macs_that_left_out_nodes_of_unknown_cost_are_marked():
    from onnx_shrink import console
    from onnx_shrink.compiler.stats import ModelStats

    fields = {f: 0 for f in ModelStats.__dataclass_fields__}
    before = ModelStats(**{**fields, "macs": 100, "nodes_without_macs": 2})
    after = ModelStats(**{**fields, "macs": 150})
    # No percentage against a bound: silero-vad's lossless fold read "≥177k -> 548k (+210%)".
    assert console._macs_arrow(before, after) == "≥100 → 150"
    assert console._macs_arrow(after, after) == "150"
    exact = ModelStats(**{**fields, "macs": 120})
    assert console._macs_arrow(after, exact) == "150 → 120 (-20%)"


def test_a_lower_bound_on_macs_a_pass_raised_is_explained_under_the_summary():
    """Silero VAD's fold read "≥177.02k → ≥548.48k": three times the work, to the eye, where
    the count had 16 nodes of unknown cost before and 2 after."""
    from types import SimpleNamespace

    from onnx_shrink.compiler import stats
    from onnx_shrink.compiler.stats import ModelStats

    fields = {f: 0 for f in ModelStats.__dataclass_fields__}
    before = ModelStats(**{**fields, "macs": 177_020, "nodes_without_macs": 16})
    after = ModelStats(**{**fields, "macs": 548_480, "nodes_without_macs": 2})
    quant = ModelStats(**{**fields, "macs": 548_480, "nodes_without_macs": 2})
    steps = [
        SimpleNamespace(name="fold", before=before, after=after),
        SimpleNamespace(name="quant", before=after, after=quant),
    ]
    assert stats.rising_bounds(steps) == (
        "≥ marks a lower bound on MACs, nodes of unknown cost left out: fold's rise counts "
        "nodes whose shapes it found (16 uncounted before, 2 after)"
    )
    # A count that fell, or rose with no fewer nodes uncounted, needs no such caption.
    steps[0] = SimpleNamespace(name="fold", before=after, after=before)
    assert stats.rising_bounds(steps) is None


def test_a_change_under_half_a_percent_does_not_read_as_none():
    """keycnn's fold: 2,674,654 -> 2,669,633 bytes printed "2.6 MiB → 2.5 MiB (-0%)"."""
    from onnx_shrink import console
    from onnx_shrink.wording import human_bytes

    assert console._arrow(2_674_654, 2_669_633, human_bytes) == "2.6 MiB → 2.5 MiB (-0.2%)"
    assert console._arrow(100, 50) == "100 → 50 (-50%)"
    assert console._arrow(1_000_000, 1_000_001) == "1.00M → 1.00M (+0.0001%)"


def test_the_html_marks_a_bound_of_macs_as_the_console_does():
    from onnx_shrink.compiler.stats import ModelStats
    from onnx_shrink.runtime_check import report, report_cells

    fields = {f: 0 for f in ModelStats.__dataclass_fields__}
    bound = ModelStats(**{**fields, "macs": 177_020, "nodes_without_macs": 6})
    after = ModelStats(**{**fields, "macs": 548_480})
    assert report_cells.change(bound, after, report._macs) == (
        f"≥{report_cells.short_count(177_020)} → {report_cells.short_count(548_480)}"
    )


def test_a_candidate_slower_than_its_reference_is_said_so_under_the_speed_table():
    """MTCNN's pnet ran 1.30x slower after quant, and nothing said so but the ratio."""
    import types

    from onnx_shrink import console
    from onnx_shrink.runtime_check.bench import LatencyComparison, LatencyStats, ModelSize

    stats = LatencyStats(**{f: 1 for f in LatencyStats.__dataclass_fields__})
    size = ModelSize(100, 50)
    for ratio, said in ((1.30, True), (1.02, False)):
        report = types.SimpleNamespace(
            latency=LatencyComparison(stats, stats, ratio),
            reference_size=size,
            candidate_size=size,
            time_by_op=None,
        )
        caption = console.speed_table(report).caption
        assert bool(caption and f"{ratio:.2f}x" in caption) == said


def test_a_high_ratio_the_candidate_won_half_the_pairs_of_is_called_noise():
    """Two copies of one file on a loaded 2-core machine read 1.20x and were called slower."""
    import types

    from onnx_shrink import console
    from onnx_shrink.runtime_check.bench import LatencyComparison, LatencyStats, ModelSize

    stats = LatencyStats(**{f: 1 for f in LatencyStats.__dataclass_fields__} | {"runs": 5})
    size = ModelSize(100, 50)
    for share, verdict in ((0.5, "noise, not a verdict"), (0.9, "the candidate is slower here")):
        latency = LatencyComparison(stats, stats, 1.2, slower_share=share)
        report = types.SimpleNamespace(
            latency=latency, reference_size=size, candidate_size=size, time_by_op=None
        )
        assert verdict in console.speed_table(report).caption


def test_a_ratio_from_one_timing_pair_is_no_verdict():
    """With --runs 1, MTCNN's O-Net read 1.45x and "slower here", while the profile below
    it showed the candidate faster (6.6 against 8.3 ms)."""
    import types

    from onnx_shrink import console
    from onnx_shrink.runtime_check.bench import LatencyComparison, LatencyStats, ModelSize

    stats = LatencyStats(**{f: 1 for f in LatencyStats.__dataclass_fields__})
    latency = LatencyComparison(stats, stats, 1.45, slower_share=1.0)
    assert not latency.slower
    size = ModelSize(100, 50)
    report = types.SimpleNamespace(
        latency=latency, reference_size=size, candidate_size=size, time_by_op=None
    )
    caption = console.speed_table(report).caption
    assert "1.45x ratio rests on 1 timing pair, too few for a verdict" in caption
    assert "--runs 5 or more" in caption and "slower here" not in caption
    # Faster on one pair is no verdict either: a pruned ResNet read "0.60x paired".
    faster = LatencyComparison(stats, stats, 0.60, slower_share=0.0)
    report.latency = faster
    assert "0.60x ratio rests on 1 timing pair" in console.speed_table(report).caption
    report.latency = LatencyComparison(stats, stats, 0.95, slower_share=0.0)
    assert console.speed_table(report).caption is None


def test_a_crash_inside_onnxruntime_still_says_where_it_happened(digits_copy):
    """onnxruntime can kill the process (SIGSEGV on a float16 FusedMatMul's session, 1.32):
    the CLI then prints the Python stack that was running rather than exiting silently."""
    import subprocess
    import sys

    crashing = (
        "import ctypes, sys, onnxruntime\n"
        "def crash(*args, **kwargs): ctypes.string_at(0)\n"
        "onnxruntime.InferenceSession.__init__ = crash\n"
        "from onnx_shrink import cli\n"
        f"sys.exit(cli.main([{str(digits_copy)!r}, '--passes', 'fold']))\n"
    )
    result = subprocess.run([sys.executable, "-c", crashing], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Segmentation fault" in result.stderr
    assert "crash" in result.stderr and "sessions.py" in result.stderr


def test_the_report_keeps_the_runs_warnings_even_when_the_console_is_quiet(digits_copy, run_cli):
    report_path = digits_copy.parent / "report.json"
    result = run_cli(
        digits_copy, "--passes", "quant-weight", "--no-check", "-q", "--report", report_path
    )
    assert result.code == 0, result.err
    assert "WARNING" not in result.err
    warnings = json.loads(report_path.read_text())["warnings"]
    assert any(w.startswith("warning: quant-weight: nothing quantized") for w in warnings)
    assert any("stay float in its 2 Gemm nodes" in w for w in warnings)
