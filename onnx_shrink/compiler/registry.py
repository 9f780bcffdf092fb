"""CLI name -> pass class: the one place in the compiler that knows passes by name."""

from __future__ import annotations

import onnx_ir as ir

from onnx_shrink.errors import PipelineSpecError
from onnx_shrink.passes.equalize import EqualizePass
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.fp16 import Float16Pass
from onnx_shrink.passes.fp32 import Float32Pass
from onnx_shrink.passes.lowrank import LowRankPass
from onnx_shrink.passes.prune import PrunePass
from onnx_shrink.passes.prune_channels import PruneChannelsPass
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass

PASS_CLASSES: tuple[type[ir.passes.PassBase], ...] = (
    FoldPass,
    EqualizePass,
    QuantPass,
    QuantDynamicPass,
    WeightOnlyQuantPass,
    Float16Pass,
    Float32Pass,
    PrunePass,
    PruneChannelsPass,
    LowRankPass,
)

REGISTRY: dict[str, type[ir.passes.PassBase]] = {cls.name: cls for cls in PASS_CLASSES}


def pass_class(name: str) -> type[ir.passes.PassBase]:
    """The pass class registered under ``name``.

    Raises:
        PipelineSpecError: no pass has that name; the message lists the valid names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineSpecError(
            f"unknown pass '{name}'; available passes: {', '.join(sorted(REGISTRY))}"
        ) from None
