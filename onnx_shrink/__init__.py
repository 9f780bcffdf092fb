"""onnx-shrink: a model-compression compiler for ONNX.

Smaller and faster at a known accuracy cost: ``shrink()`` runs a pass pipeline on a model and
onnxruntime verifies what it gained and what it cost.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnx_shrink.api import CheckOptions, ShrinkResult, shrink  # noqa: E402
from onnx_shrink.compiler.io import load, save  # noqa: E402
from onnx_shrink.errors import (  # noqa: E402
    BadModelError,
    CandidateFailedError,
    CheckFailed,
    DataError,
    PassFailedError,
    PipelineSpecError,
    RunFailedError,
    ShrinkError,
)
from onnx_shrink.passes.equalize import EqualizePass  # noqa: E402
from onnx_shrink.passes.fold import FoldPass  # noqa: E402
from onnx_shrink.passes.fp16 import Float16Pass  # noqa: E402
from onnx_shrink.passes.lowrank import LowRankPass  # noqa: E402
from onnx_shrink.passes.prune import PrunePass  # noqa: E402
from onnx_shrink.passes.prune_channels import PruneChannelsPass  # noqa: E402
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass  # noqa: E402
from onnx_shrink.passes.quant.static import QuantPass  # noqa: E402
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass  # noqa: E402
from onnx_shrink.runtime_check.numeric_report import Tolerances  # noqa: E402

__all__ = [
    "BadModelError",
    "CandidateFailedError",
    "CheckFailed",
    "CheckOptions",
    "DataError",
    "EqualizePass",
    "Float16Pass",
    "FoldPass",
    "LowRankPass",
    "PassFailedError",
    "PipelineSpecError",
    "PruneChannelsPass",
    "PrunePass",
    "RunFailedError",
    "QuantDynamicPass",
    "QuantPass",
    "ShrinkError",
    "ShrinkResult",
    "Tolerances",
    "WeightOnlyQuantPass",
    "__version__",
    "load",
    "save",
    "shrink",
]
