"""Where the time goes: onnxruntime's profile by op type, taken where the check finds the
candidate slower, in the console, the JSON and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import pytest

from models import digits
from onnx_shrink import console, shrink
from onnx_shrink.runtime_check import bench, checker, op_time
from onnx_shrink.runtime_check.op_time import OpTime, OpTimeComparison, OpTimes
from onnx_shrink.runtime_check.report import html_report
from tests.helpers import digits_images

DATA = digits.TEST_DATA_PATH


def _event(name: str, op: str, ts: float, dur: float) -> dict:
    return {
        "cat": "Node",
        "name": f"{name}_kernel_time",
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op},
    }


def test_the_summary_keeps_the_last_runs_and_averages_them():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # the warm-up
        _event("conv", "Conv", 10, 80),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        _event("conv", "Conv", 210, 40),
        _event("q", "QuantizeLinear", 260, 10),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        _event("conv", "Conv", 410, 60),
        _event("q", "QuantizeLinear", 470, 20),
        _event("q2", "QuantizeLinear", 480, 10),
        {"cat": "Session", "name": "model_initialization", "ts": 0, "dur": 5},
    ]
    times = op_time.summarize(events, runs=2)
    assert times.runs == 2
    assert times.ops == (OpTime("Conv", 1, 0.05), OpTime("QuantizeLinear", 2, 0.02))
    assert times.by_kind() == {"integer": 0, "conversion": 0.02, "layout": 0, "float": 0.05}


@pytest.mark.parametrize(
    ("op_type", "kind"),
    [
        ("QLinearConv", "integer"),
        ("MatMulIntegerToFloat", "integer"),
        ("DequantizeLinear", "conversion"),
        ("ReorderInput", "layout"),
        ("FusedConv", "float"),
    ],
)
def test_op_types_are_grouped_by_what_they_do_in_a_quantized_model(op_type, kind):
    assert op_time.kind(op_type) == kind


def test_a_real_profile_names_the_kernels_onnxruntime_ran():
    times = op_time.profile(digits.MODEL_PATH, {"image": digits_images(16)}, provider="cpu", runs=3)
    assert times.runs == 3
    assert {op.kind for op in times.ops} <= {"float", "layout"}  # NCHWc reorders
    convs = sum(node.op_type == "Conv" for node in onnx.load(digits.MODEL_PATH).graph.node)
    assert times.get("Conv").nodes == convs
    assert times.total_ms > 0


def _forced_latency(monkeypatch, ratio: float, slower_share: float) -> None:
    """The latency's verdict forced (by its ratio and share of pairs lost): the profile's
    trigger, not its figures."""
    timed = bench.compare_latency

    def forced(*args, **kwargs):
        latency = timed(*args, **kwargs)
        return dataclasses.replace(latency, ratio=ratio, slower_share=slower_share)

    monkeypatch.setattr(bench, "compare_latency", forced)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("op_time") / "digits.int8.onnx"
    shrink(digits.MODEL_PATH, "fold,quant", output=path, calibration=DATA, check=False)
    return str(path)


def test_a_slower_candidate_is_profiled_and_shown(monkeypatch, quantized):
    _forced_latency(monkeypatch, 2.0, slower_share=1.0)
    report = checker.check(digits.MODEL_PATH, quantized, DATA, latency_runs=5)
    times = report.time_by_op
    assert times is not None and times.candidate.runs >= 1
    assert {op.kind for op in times.reference.ops} <= {"float", "layout"}
    kinds = times.candidate.by_kind()
    assert kinds["integer"] > 0 and kinds["conversion"] > 0
    assert "the table below shows where its time goes" in console.speed_table(report).caption
    tables = console.check_tables(report)
    assert tables[-1].title.startswith("where the time goes")
    assert "Where the time goes" in html_report(check=report)
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["time_by_op"]["candidate"]["runs"] == times.candidate.runs


def test_a_candidate_not_found_slower_is_not_profiled(monkeypatch, quantized):
    profiled = []
    monkeypatch.setattr(op_time, "compare", lambda *a, **k: profiled.append(a))
    _forced_latency(monkeypatch, 1.0, slower_share=0.5)
    report = checker.check(digits.MODEL_PATH, quantized, DATA, latency_runs=5)
    assert report.time_by_op is None and profiled == []
    assert "Where the time goes" not in html_report(check=report)


def test_a_failed_profile_leaves_the_check_standing(monkeypatch, quantized, caplog):
    _forced_latency(monkeypatch, 2.0, slower_share=1.0)

    def failing(*args, **kwargs):
        raise RuntimeError("profiler unavailable")

    monkeypatch.setattr(op_time, "compare", failing)
    with caplog.at_level(logging.WARNING):
        report = checker.check(digits.MODEL_PATH, quantized, DATA, latency_runs=5)
    assert report.time_by_op is None and report.latency.ratio == 2.0
    assert "the profile of where the time goes failed: profiler unavailable" in caplog.text


def test_the_caption_names_the_float_ops_the_candidate_adds():
    """PP-LCNet quantized: onnxruntime runs its 28 hard-swishes inside the float Convs, and
    as a float HardSigmoid and Mul each between integer Convs (the SE blocks' 3 Muls are in
    both)."""
    reference = OpTimes(10, (OpTime("Conv", 32, 78.2), OpTime("Mul", 3, 0.9)))
    candidate = OpTimes(
        10,
        (
            OpTime("DequantizeLinear", 30, 44.4),
            OpTime("Mul", 31, 42.2),
            OpTime("QLinearConv", 32, 41.2),
            OpTime("HardSigmoid", 30, 32.1),
        ),
    )
    table = console.op_time_table(OpTimeComparison(reference, candidate), batch=48)
    added = table.caption.split(": ")[1].split(";")[0]
    assert added == "Mul +28 (41.300 ms), HardSigmoid +30 (32.100 ms)"
    kinds = {str(c) for c in table.columns[0]._cells}
    assert {"integer kernels", "conversion kernels", "float kernels", "total"} <= kinds
    assert np.isclose(candidate.total_ms, 44.4 + 42.2 + 41.2 + 32.1)
