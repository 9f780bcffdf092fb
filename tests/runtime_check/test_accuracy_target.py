"""quant.max_error: the worst layers kept float until the model's output error meets it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from models import digits
from onnx_shrink import shrink
from onnx_shrink.compiler import io, pipeline, spec
from onnx_shrink.errors import PassFailedError, PipelineSpecError, ShrinkError
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import accuracy_target, checker
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from tests.helpers import run_ort, target_outcome
from tests.runtime_check.test_sensitivity import HARD, _folded, _report, _with_hard_layer

DATA = digits.TEST_DATA_PATH


def _hard_model() -> ir.Model:
    """digits, folded, with one Gemm that per-tensor int8 weights ruin (relative error ~1)."""
    return _with_hard_layer(_folded())


def _run(model: ir.Model, **options) -> tuple:
    result = shrink(model, [QuantPass(per_channel=False, **options)], calibration=DATA, check=False)
    (outcome,) = result.accuracy_targets
    return result, outcome


def _error_on_calibration(model: ir.Model, result) -> float:
    """The worst output's relative error of the written model, measured apart from the
    search: the number the outcome reports must be this one."""
    numeric = checker.compare(io.to_bytes(model), io.to_bytes(result.model), DATA)
    return max(output.relative_error for output in numeric.outputs)


def test_a_target_the_whole_pass_misses_keeps_the_worst_layer_float_and_reports_its_error():
    model = _hard_model()
    before = io.to_bytes(model)
    result, outcome = _run(model, max_error=0.05)
    assert io.to_bytes(model) == before  # the caller's model is untouched
    assert outcome.whole_error > 0.5  # every layer quantized: the target is missed
    assert outcome.met and outcome.layers == 1 and outcome.added == (HARD,)
    assert outcome.error <= 0.05
    assert outcome.error == pytest.approx(_error_on_calibration(model, result), rel=1e-6)
    assert outcome.bytes > outcome.whole_bytes  # what the float layer costs, measured
    assert outcome.samples == 450 and len(outcome.attempts) == 2
    assert result.steps[0].prepare_seconds >= outcome.seconds  # the search, before the pass
    # The step is the pass that ran: the search's exclusions, no target left to meet.
    (step,) = result.steps
    assert step.spec == spec.describe(QuantPass(per_channel=False, exclude=(HARD,)))
    # The option it prints reproduces the model without the search.
    (again,) = spec.parse_spec("quant", [shlex.split(outcome.exclude_option())[1]])
    plain = shrink(
        model, [dataclasses.replace(again, per_channel=False)], calibration=DATA, check=False
    )
    assert io.to_bytes(plain.model) == io.to_bytes(result.model)


def test_a_target_the_whole_pass_meets_adds_nothing_after_one_measurement(monkeypatch):
    """Measured first, the whole pass needs no ranking (YOLOv8n spent 130 s on one)."""

    def ranking(*args, **kwargs):
        raise AssertionError("the layers are ranked for a target the whole pass meets")

    monkeypatch.setattr(accuracy_target.sensitivity_mod, "sensitivity", ranking)
    model = _hard_model()
    result, outcome = _run(model, max_error=2.0)
    assert outcome.met and outcome.layers == 0 and outcome.added == ()
    assert [a.layers for a in outcome.attempts] == [0]
    assert outcome.error == outcome.whole_error
    assert outcome.exclude_option() is None
    plain = shrink(model, [QuantPass(per_channel=False)], calibration=DATA, check=False)
    assert io.to_bytes(plain.model) == io.to_bytes(result.model)
    assert "met with every layer quantized" in outcome.summary()


def test_a_target_missed_within_the_budget_keeps_the_least_error_measured_and_warns(
    caplog, monkeypatch
):
    monkeypatch.setattr(accuracy_target, "MAX_MEASUREMENTS", 2)
    model = _hard_model()
    with caplog.at_level(logging.WARNING, "onnx_shrink"):
        result, outcome = _run(model, max_error=0.005)
    assert not outcome.met and outcome.budget_spent
    assert [a.layers for a in outcome.attempts] == [0, 1]
    assert outcome.error == min(a.error for a in outcome.attempts) and outcome.layers == 1
    assert outcome.error == pytest.approx(_error_on_calibration(model, result), rel=1e-6)
    assert "quant.max_error=0.005 is not met" in caplog.text
    assert "measurement budget" in caplog.text
    assert "NOT met" in outcome.summary() and "stopped at 2 measurements" in outcome.summary()


def test_a_target_only_every_layer_float_meets_is_met_so_with_a_warning(caplog):
    """The search may keep every layer float, where the sensitivity hint never does: a pass
    with one layer left to quantize otherwise wrote a model of error 1.0 for a target of
    0.05 that keeping the layer float meets."""
    model = _hard_model()
    others = dict(exclude_op_types=("Conv", "BatchNormalization"), exclude=("/head/head.4/Gemm",))
    with caplog.at_level(logging.WARNING, "onnx_shrink"):
        result, outcome = _run(model, max_error=0.05, **others)
    assert outcome.met and outcome.every_layer and outcome.added == (HARD,)
    assert _error_on_calibration(model, result) <= 0.05
    assert "met only with every layer float" in caplog.text
    assert "nothing is quantized" in outcome.summary()
    zero_result, zero = _run(model, max_error=0.0)
    assert zero.met and zero.every_layer and zero.error == 0.0
    assert not zero_result.steps[0].modified


def test_the_search_says_the_passs_warnings_once(caplog):
    with caplog.at_level(logging.WARNING, "onnx_shrink"):
        _run(_hard_model(), max_error=0.05, exclude=(HARD, "no/such/node"))
    assert caplog.text.count("no/such/node") == 1


def test_a_pass_verify_each_rolls_back_says_so_and_offers_no_option():
    from onnx_shrink import CheckOptions
    from onnx_shrink.runtime_check.numeric_report import Tolerances

    strict = CheckOptions(data=DATA, verify_each=True, tolerances=Tolerances(min_cosine=1.0))
    model = _hard_model()
    result = shrink(
        model, [QuantPass(per_channel=False, max_error=0.05)], calibration=DATA, check=strict
    )
    (outcome,) = result.accuracy_targets
    assert result.steps[0].rolled_back and outcome.rolled_back and outcome.pass_index == 0
    assert "rolled the pass back" in outcome.summary()
    assert outcome.exclude_option() is None


def _search(errors: dict[int, float], monkeypatch, report=None) -> tuple:
    """A search over ``report`` (40 named layers by default) whose measurement of the
    pass excluding n patterns gives ``errors[n]`` (1.0 where not given); and the list of
    the pattern counts measured."""
    report = report or _report([f"/l{i}" for i in range(40)])
    measured = []

    def worst_error(model, config, data, **kwargs):
        measured.append(len(config.exclude))
        error = errors.get(len(config.exclude), 1.0)
        return sensitivity_mod.Measured(error, 0, 1, len(config.exclude) < len(report.layers))

    monkeypatch.setattr(accuracy_target.sensitivity_mod, "worst_error", worst_error)
    measure = accuracy_target._Measure(None, "cpu", None, None, None)
    return accuracy_target._Search(None, QuantPass(), report, measure), measured


def test_the_search_doubles_then_bisects_to_the_fewest_layers_that_meet_the_target(monkeypatch):
    search, measured = _search({k: 0.05 for k in range(11, 41)}, monkeypatch)
    assert search.run(0.1) == 11
    assert measured == [0, 1, 2, 4, 8, 16, 12, 10, 11]
    assert search.error(11) == 0.05 and measured[-1] == 11  # measured once


def test_the_search_keeps_a_measured_k_that_meets_it_though_errors_are_not_monotone(
    monkeypatch,
):
    """Layers' errors interact: 8 float can be worse than 4 (PP-OCRv4 rec: 0.163 against
    0.131). The answer is always a k measured to meet the target."""
    search, measured = _search({4: 0.09, 8: 0.2, 6: 0.08, 5: 0.12}, monkeypatch)
    assert search.run(0.1) == 4 and measured == [0, 1, 2, 4, 3]


def test_the_search_measures_each_exclusion_once_where_layers_add_none(monkeypatch):
    """Unnamed and inert layers add no pattern: a k that makes the same exclusions as a
    smaller one is not measured again, and k stops where the patterns stop growing."""
    layers = list(_report(["/a", "", "/b", "/c", "/d", ""]).layers)
    layers[2] = dataclasses.replace(layers[2], inert=True)
    report = dataclasses.replace(_report([]), layers=tuple(layers))
    search, measured = _search({3: 0.05}, monkeypatch, report)
    assert search.most == 4  # /a, (unnamed), /c, /d: nothing grows past them
    assert search.run(0.1) == 4
    # k=1: /a; k=2 adds nothing (unnamed), not measured again; k=4: /a,/c,/d; k=3: /a,/c.
    assert measured == [0, 1, 3, 2]


def test_the_search_stops_at_the_last_layer_it_can_keep_float_and_at_its_budget(monkeypatch):
    search, measured = _search({}, monkeypatch, _report(["/a", "/b", "/c", "/d", "/e"]))
    assert search.most == 5  # every layer may be float: the target decides
    search.run(0.1)
    assert measured == [0, 1, 2, 4, 5] and not search.spent
    monkeypatch.setattr(accuracy_target, "MAX_MEASUREMENTS", 4)
    capped, measured = _search({k: 0.05 for k in range(3, 41)}, monkeypatch)
    assert capped.run(0.1) == 4  # met there, with no measurement left to bisect
    assert measured == [0, 1, 2, 4] and capped.spent


def test_max_error_is_refused_with_only_and_said_to_need_shrink_when_bound_by_hand(caplog):
    with pytest.raises(ValueError, match="with only it cannot"):
        QuantPass(only=("a",), max_error=0.1)
    with pytest.raises(PipelineSpecError, match="max_error"):
        spec.parse_spec("quant", ["quant.max_error=-1"])
    model = _folded()
    dataset = data_mod.prepare(data_mod.specs_from_model(model), DATA)
    quant = QuantPass(max_error=0.1)
    from onnx_shrink.runtime_check import collect

    stats = collect.collect(model, quant.requests(model), dataset)
    with caplog.at_level(logging.WARNING, "onnx_shrink"):
        assert quant.bind(stats)(model).modified
    assert "max_error=0.1 is met by onnx_shrink.shrink()" in caplog.text


def test_the_sizes_reported_of_a_model_with_unnamed_nodes_are_those_written():
    # Swift-F0's nodes have no names: the run names them (Conv_293) and takes the names back
    # when it writes the result, but the search's sizes counted them, 2.8 KiB too many.
    proto = io.serialize_proto(_hard_model())
    for node in proto.graph.node:
        node.ClearField("name")
    result, outcome = _run(io.load(proto), max_error=0.05)
    assert outcome.met and outcome.layers == 1
    assert not any(node.name for node in result.model.graph if node.op_type == "Gemm")
    assert outcome.bytes == len(io.to_bytes(result.model))
    # The report alone (no target) measures the whole pass so too: the model written here.
    plain = shrink(
        io.load(proto),
        [QuantPass(per_channel=False)],
        calibration=DATA,
        check=False,
        sensitivity=True,
    )
    effect = plain.sensitivity.hint_effect
    assert effect is not None and effect.whole_bytes == len(io.to_bytes(plain.model))


def test_with_sensitivity_the_searchs_report_serves_with_its_hint_measured(monkeypatch):
    def rerun(*args, **kwargs):
        raise AssertionError("the report is measured a second time")

    monkeypatch.setattr(sensitivity_mod, "before_quant", rerun)
    result = shrink(
        _hard_model(),
        [QuantPass(per_channel=False, max_error=0.05)],
        calibration=DATA,
        check=False,
        sensitivity=True,
    )
    report = result.sensitivity
    assert report is not None and report.layers[0].node == HARD
    assert report.hint_effect is not None
    (outcome,) = result.accuracy_targets
    # The hint's measurements (the whole pass; its 3 worst float) are the search's own.
    model = _hard_model()
    dataset = data_mod.prepare(data_mod.specs_from_model(model), DATA)
    whole = QuantPass(per_channel=False)
    fresh = sensitivity_mod.worst_error(model, whole, dataset)
    assert outcome.whole_error == pytest.approx(fresh[0], rel=1e-9)
    assert outcome.whole_bytes == fresh[1]
    hinted = dataclasses.replace(whole, exclude=report.exclude_patterns(3))
    assert report.hint_effect.hinted == pytest.approx(
        sensitivity_mod.worst_error(model, hinted, dataset)[0], rel=1e-9
    )
    assert [a.layers for a in outcome.attempts] == [0, 1, 3]


def test_cli_prints_what_the_target_kept_float_and_the_reports_hold_it(
    run_cli, digits_copy, tmp_path
):
    report, page = tmp_path / "r.json", tmp_path / "r.html"
    args = ["--passes", "fold,quant", "--calibration", DATA, "--no-check"]
    target = ["--set", "quant.max_error=0.002", "--report", report, "--html", page]
    result = run_cli(digits_copy, *args, *target)
    assert result.code == 0, result.err
    assert "quant.max_error=0.002 met with " in result.out
    assert "the same model without the search (in place of quant.max_error): --set" in result.out
    (outcome,) = json.loads(report.read_text())["accuracy_targets"]
    assert outcome["met"] and outcome["error"] <= 0.002 < outcome["whole_error"]
    assert outcome["exclude_option"].startswith("--set quant.exclude=")
    html = page.read_text()
    assert "Accuracy target" in html and "quant(max_error=0.002)" in html
    # The summary table shows the pass as given; the exclusions come under it, once.
    assert "quant(max_error=0.002)" in result.out and "quant.max_error search" in result.out
    assert result.out.count(outcome["exclude"][-1]) == 1
    copy = tmp_path / "again.onnx"
    again = run_cli(digits_copy, *args, *shlex.split(outcome["exclude_option"]), "-o", copy)
    assert again.code == 0, again.err
    assert copy.read_bytes() == digits_copy.with_name("digits.shrunk.onnx").read_bytes()


def test_a_preparer_that_raises_fails_the_pass_by_name():
    def broken(index, pass_, model):
        raise RuntimeError("boom")

    with pytest.raises(PassFailedError, match="pass 'fold' failed.*boom"):
        pipeline.run(_folded(), spec.parse_spec("fold"), prepare=broken)


def test_layers_are_ranked_on_the_first_samples_unless_the_report_is_wanted():
    model = _hard_model()
    dataset = data_mod.prepare(data_mod.specs_from_model(model), DATA)
    quant = QuantPass(per_channel=False, max_error=0.05)
    _, outcome, report = accuracy_target.meet_target(model, quant, dataset)
    assert report.samples == accuracy_target.RANKING_SAMPLES and outcome.samples == 450
    _, _, wanted = accuracy_target.meet_target(model, quant, dataset, hint=True)
    assert wanted.samples == 450


def test_a_missed_target_is_not_said_met_where_every_layer_float_measured_least(monkeypatch):
    """Where every measurement misses, the least error can be the one with nothing
    quantized: the line says the target is not met, not "met only with every layer"."""
    real = sensitivity_mod.worst_error

    def never_exact(*args, **kwargs):
        measured = real(*args, **kwargs)
        return measured._replace(error=measured.error + 0.01)

    monkeypatch.setattr(accuracy_target.sensitivity_mod, "worst_error", never_exact)
    result, outcome = _run(_hard_model(), max_error=0.001)
    assert not outcome.met and not outcome.every_layer
    assert "NOT met" in outcome.summary() and "nothing is quantized" not in outcome.summary()


def _argmax_classifier(scale: float = 0.1) -> onnx.ModelProto:
    """x [N, 4] -> MatMul -> ArgMax: a class id per sample, no float output."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("ArgMax", ["y"], ["label"], axis=1, name="argmax"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None, 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [scale * i for i in range(12)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_a_classifier_ending_in_argmax_is_measured_on_the_scores_it_reads():
    # Class ids have no relative error; the scores the ArgMax reads have. The model written
    # keeps its one output.
    data = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    result = shrink(_argmax_classifier(), [QuantPass(max_error=0.1)], calibration=data, check=False)
    (outcome,) = result.accuracy_targets
    assert outcome.met and 0 < outcome.error <= 0.1
    assert [v.name for v in result.model.graph.outputs] == ["label"]


def test_the_scores_measured_are_those_of_the_model_the_pass_writes():
    """The scores are output through an Identity: as a graph output of their own, quant put
    Q/DQ on them in the measured copies, which the pass's result has not."""
    data = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    proto = _argmax_classifier()
    result = shrink(proto, [QuantPass(max_error=0.1)], calibration=data, check=False)
    (outcome,) = result.accuracy_targets

    def scores(model: onnx.ModelProto) -> np.ndarray:
        argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
        model.graph.output.append(helper.make_tensor_value_info(argmax.input[0], 1, None))
        return run_ort(model.SerializeToString(), data)[-1]

    quantized = onnx.load_from_string(io.to_bytes(result.model))
    want, got = scores(proto), scores(quantized)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert outcome.whole_error == pytest.approx(error, rel=1e-5)


def test_a_model_whose_outputs_no_float_decides_is_refused_by_the_target():
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Shape", ["y"], ["shape"], name="shape"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1 * i for i in range(12)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    with pytest.raises(ShrinkError, match="quant.max_error: the model has no float output"):
        shrink(model, [QuantPass(max_error=0.1)], calibration=data, check=False)


@pytest.mark.network
def test_minilm_meets_a_target_the_whole_pass_misses_and_new_sentences_see_it(tmp_path):
    """A real transformer: every MatMul quantized misses 0.05 (about 0.075); the search
    keeps a few float, and 64 sentences it never saw come out closer to fp32's."""
    from models.fetch import fetch
    from models.text import minilm_dataset

    source = fetch("minilm")
    arrays = dict(np.load(minilm_dataset(tmp_path / "s.npz", n=96)))
    calibration = {name: value[:32] for name, value in arrays.items()}
    held_out = {name: value[32:] for name, value in arrays.items()}
    plain = shrink(source, "fold,quant", calibration=calibration, check=False)
    aimed = shrink(
        source, "fold,quant", sets=["quant.max_error=0.05"], calibration=calibration, check=False
    )
    (outcome,) = aimed.accuracy_targets
    assert outcome.whole_error > 0.05 >= outcome.error and 0 < len(outcome.added) <= 6

    def embedding_error(result) -> float:
        outputs = checker.compare(source, io.to_bytes(result.model), held_out).outputs
        return next(o for o in outputs if o.elements == 64 * 384).relative_error

    assert embedding_error(aimed) < embedding_error(plain)


def test_each_measurement_of_the_search_reports_its_runs(monkeypatch):
    """PP-OCRv4 rec's search compared each candidate with the float model (3-5 s each) under
    its calibration's last status: each measurement names itself and counts its samples."""
    monkeypatch.setattr(accuracy_target, "MAX_MEASUREMENTS", 2)
    calls = []
    shrink(
        _hard_model(),
        [QuantPass(per_channel=False, max_error=0.005)],
        calibration=DATA,
        check=False,
        on_calibration=lambda phase, done, total: calls.append((phase, done, total)),
    )
    for measurement in ("all quantized", "1 worst float"):
        phase = f"quant.max_error: {measurement}: {progress_mod.OUTPUTS}"
        counted = [(done, total) for p, done, total in calls if p == phase]
        assert counted[0] == (0, 450) and counted[-1] == (450, 450)
    assert ("quant.max_error: 1 worst float: statistics", 450, 450) in calls


def test_an_error_just_past_the_target_does_not_read_as_the_target():
    """rxnmap: 0.05004 with every layer quantized printed as "0.05" beside max_error=0.05,
    so the node the search kept float (20.4 -> 32.4 MiB) looked needless."""
    outcome = target_outcome(whole_error=0.05004105930235406)
    assert "met with the 1 worst layer float: " in outcome.summary()
    assert "0.05004 with every layer quantized" in outcome.summary()
    assert "worst output relative error 0.0313 " in outcome.summary()
    assert accuracy_target.beside_target(0.0499996, 0.05) == "0.0499996"
    assert accuracy_target.beside_target(0.05, 0.05) == "0.05"
    assert accuracy_target.beside_target(0.123456, 0.05) == "0.123"
    with_companions = dataclasses.replace(outcome, layers=9, added=tuple("abcdefghijkl"))
    assert "met with the 9 worst layers float (12 nodes): " in with_companions.summary()
