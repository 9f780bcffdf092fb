"""The CUDA execution provider path. Runs only where onnxruntime has CUDA (onnxruntime-gpu)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from models import digits
from onnx_shrink.runtime_check.bench import benchmark
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.numeric_report import Tolerances

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="no CUDAExecutionProvider in this onnxruntime build (needs onnxruntime-gpu "
        "and an NVIDIA GPU)",
    ),
]


def test_check_on_cuda_matches_cpu_within_float_rounding():
    report = check(
        digits.MODEL_PATH,
        digits.MODEL_PATH,
        digits.TEST_DATA_PATH,
        provider="cuda:device_id=0",
        latency_runs=20,
        tolerances=Tolerances(atol=0, max_accuracy_drop=0),
    )
    assert report.passed
    assert report.provider == "cuda:device_id=0"
    assert report.numeric.reference_accuracy >= 0.95


def test_benchmark_on_cuda_reports_latency_and_memory():
    report = benchmark(digits.MODEL_PATH, batch_sizes=(1, 64), runs=20, provider="cuda")
    assert [row.batch for row in report.latency] == [1, 64]
    assert all(row.p50_ms > 0 for row in report.latency)
