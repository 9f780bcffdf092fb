"""Everything that runs a model on onnxruntime: sessions, data, numerics, speed, reports.

The public calls: ``compare`` (numerics and accuracy), ``check`` (numerics, per-layer error,
latency, size), ``benchmark`` (latency grid, memory, size).
"""

from __future__ import annotations

from onnx_shrink.runtime_check.bench import BenchmarkReport, benchmark
from onnx_shrink.runtime_check.checker import CheckReport, check, compare
from onnx_shrink.runtime_check.compare import NumericReport, Tolerances

__all__ = [
    "BenchmarkReport",
    "CheckReport",
    "NumericReport",
    "Tolerances",
    "benchmark",
    "check",
    "compare",
]
