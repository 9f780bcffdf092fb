"""What ``lowrank`` tells the user: each layer's decision (INFO) and the layers whose fit
follows too few calibration rows (a warning)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_shrink.passes.lowrank import LayerPlan, _Layer

logger = logging.getLogger("onnx_shrink.passes.lowrank")  # the pass's own lines


def warn_few_rows(layers: Sequence[_Layer]) -> None:
    """One warning for the layers whose Gram comes from fewer input rows than the layer has
    inputs: their whitening follows the calibration samples (MTCNN's onet, 64 crops for a
    1152-wide Gemm: error 4.5e-6 on those crops, 0.062 on others)."""
    few = [
        f"{layer.node.name or layer.node.op_type} ({layer.gram_rows} < {layer.shape[0]})"
        for layer in layers
        if layer.gram_rows is not None and layer.gram_rows < layer.shape[0]
    ]
    if few:
        logger.warning(
            "lowrank: %d layer(s) saw fewer calibration rows than they have inputs, e.g. %s: "
            "their fit can follow those samples closely; calibrate on more, and check on others",
            len(few),
            ", ".join(few[:3]),
        )


def log_table(plans: Sequence[LayerPlan]) -> None:
    """One INFO line per layer (activation x activation MatMuls left out), then the totals."""
    for p in plans:
        if p.reason != "weight is not a constant":
            error = "" if p.error is None else f", error {p.error:.4f}"
            what = f"rank {p.rank}{error}" if p.rank is not None else f"dense: {p.reason}"
            size = f"{p.op_type} {p.shape[0]}x{p.shape[1]}" if p.shape[0] else p.op_type
            logger.info(f"lowrank: {p.node} ({size}) {p.params_before} -> {p.params_after}, {what}")
    split = [p for p in plans if p.rank is not None]
    before, after = sum(p.params_before for p in split), sum(p.params_after for p in split)
    saved = 100.0 * (1 - after / before) if before else 0.0
    logger.info(
        f"lowrank: {len(split)} of {len(plans)} layers split: {before} -> {after} (-{saved:.1f}%)"
    )
