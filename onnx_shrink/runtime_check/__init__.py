"""Everything that runs a model on onnxruntime: sessions, data, numerics, speed, reports.

The public calls: ``compare`` (numerics and accuracy), ``check`` (numerics, per-layer error,
latency, size), ``benchmark`` (latency grid, memory, size), ``layer_sensitivity`` (the output
error of each quantized layer alone; module ``sensitivity``, which the function must not shadow).
"""

from __future__ import annotations

from onnx_shrink.runtime_check.bench import BenchmarkReport, benchmark
from onnx_shrink.runtime_check.checker import CheckReport, check, compare
from onnx_shrink.runtime_check.numeric_report import NumericReport, Tolerances
from onnx_shrink.runtime_check.sensitivity import sensitivity as layer_sensitivity
from onnx_shrink.runtime_check.sensitivity_report import SensitivityReport

__all__ = [
    "BenchmarkReport",
    "CheckReport",
    "NumericReport",
    "SensitivityReport",
    "Tolerances",
    "benchmark",
    "check",
    "compare",
    "layer_sensitivity",
]
