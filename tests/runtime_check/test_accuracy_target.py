"""quant.max_error: the worst layers kept float until the model's output error meets it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex

import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink import shrink
from onnx_shrink.compiler import io, pipeline, spec
from onnx_shrink.errors import PassFailedError, PipelineSpecError
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import accuracy_target, checker
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
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
    # The step is the pass that ran: the search's exclusions, no target left to meet.
    (step,) = result.steps
    assert step.spec == spec.describe(QuantPass(per_channel=False, exclude=(HARD,)))
    # The option it prints reproduces the model without the search.
    (again,) = spec.parse_spec("quant", [shlex.split(outcome.exclude_option())[1]])
    plain = shrink(
        model, [dataclasses.replace(again, per_channel=False)], calibration=DATA, check=False
    )
    assert io.to_bytes(plain.model) == io.to_bytes(result.model)


def test_a_target_the_whole_pass_meets_adds_nothing_after_one_measurement():
    model = _hard_model()
    result, outcome = _run(model, max_error=2.0)
    assert outcome.met and outcome.layers == 0 and outcome.added == ()
    assert [a.layers for a in outcome.attempts] == [0]
    assert outcome.error == outcome.whole_error
    assert outcome.exclude_option() is None
    plain = shrink(model, [QuantPass(per_channel=False)], calibration=DATA, check=False)
    assert io.to_bytes(plain.model) == io.to_bytes(result.model)
    assert "met with every layer quantized" in outcome.summary()


def test_an_unreachable_target_keeps_the_least_error_measured_and_warns(caplog):
    model = _hard_model()
    with caplog.at_level(logging.WARNING, "onnx_shrink"):
        result, outcome = _run(model, max_error=0.0)
    assert not outcome.met
    least = min(outcome.attempts, key=lambda a: a.error)
    assert outcome.error == least.error and outcome.layers == least.layers
    assert outcome.error == pytest.approx(_error_on_calibration(model, result), rel=1e-6)
    assert "quant.max_error=0 cannot be met" in caplog.text
    assert "NOT met" in outcome.summary()
    # Never every layer float: the pass still quantizes something.
    assert result.steps[0].modified


def _search(errors: dict[int, float], names: int = 40) -> accuracy_target._Search:
    """A search over a report of ``names`` layers whose measurement with the k worst float
    gives ``errors[k]`` (1.0 where not given)."""
    report = _report([f"/l{i}" for i in range(names)])
    search = accuracy_target._Search(None, QuantPass(), report, None, "cpu", None)
    measured = []

    def error(k: int) -> float:
        measured.append(k)
        patterns = report.exclude_patterns(k)
        search.attempts[patterns] = accuracy_target.Attempt(k, k, errors.get(k, 1.0), 0)
        return errors.get(k, 1.0)

    search.error = error
    search.measured = measured
    return search


def test_the_search_doubles_then_bisects_to_the_fewest_layers_that_meet_the_target():
    search = _search({k: 0.05 for k in range(11, 40)})
    assert search.run(0.1) == 11
    assert search.measured == [0, 1, 2, 4, 8, 16, 12, 10, 11]


def test_the_search_keeps_a_measured_k_that_meets_it_though_errors_are_not_monotone():
    """Layers' errors interact: 8 float can be worse than 4 (PP-OCRv4 rec: 0.163 against
    0.131). The answer is always a k measured to meet the target."""
    search = _search({4: 0.09, 8: 0.2, 6: 0.08, 5: 0.12})
    chosen = search.run(0.1)
    assert chosen == 4 and search.measured == [0, 1, 2, 4, 3]


def test_the_search_stops_at_the_last_layer_it_can_keep_float_and_at_its_budget(monkeypatch):
    search = _search({}, names=5)  # never met: k stops at 4, never all five
    assert search.most == 4
    search.run(0.1)
    assert search.measured == [0, 1, 2, 4]
    monkeypatch.setattr(accuracy_target, "MAX_MEASUREMENTS", 4)
    capped = _search({k: 0.05 for k in range(3, 40)})
    assert capped.run(0.1) == 4  # met there, with no measurement left to bisect
    assert capped.measured == [0, 1, 2, 4]


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
    # The hint's measurement of the whole pass is the search's first.
    assert outcome.whole_error == report.hint_effect.whole
    assert [a.layers for a in outcome.attempts] == [0, 1]


def test_cli_prints_what_the_target_kept_float_and_the_reports_hold_it(
    run_cli, digits_copy, tmp_path
):
    report, page = tmp_path / "r.json", tmp_path / "r.html"
    args = ["--passes", "fold,quant", "--calibration", DATA, "--no-check"]
    target = ["--set", "quant.max_error=0.002", "--report", report, "--html", page]
    result = run_cli(digits_copy, *args, *target)
    assert result.code == 0, result.err
    assert "quant.max_error=0.002 met with the " in result.out
    assert "the same without the search: --set " in result.out
    (outcome,) = json.loads(report.read_text())["accuracy_targets"]
    assert outcome["met"] and outcome["error"] <= 0.002 < outcome["whole_error"]
    assert outcome["exclude_option"].startswith("--set quant.exclude=")
    assert "Accuracy target" in page.read_text()
    again = run_cli(digits_copy, *args, *shlex.split(outcome["exclude_option"]))
    assert again.code == 0, again.err


def test_a_preparer_that_raises_fails_the_pass_by_name():
    def broken(index, pass_, model):
        raise RuntimeError("boom")

    with pytest.raises(PassFailedError, match="pass 'fold' failed.*boom"):
        pipeline.run(_folded(), spec.parse_spec("fold"), prepare=broken)
