"""Model-output error of candidate edits, many measured in one streaming run.

A data-aware pass's ``Probe`` edits a copy of the model (``lowrank``: one layer replaced by
one rank's factors). As ``sensitivity`` does for quantized layers, the edited copies run
beside the unedited graph in one combined model that shares the graph inputs and the
unchanged initializers (only what an edit adds is a copy's own, under suffixed names), so
``batch`` probes cost about one model's weights plus ``batch`` copies of activations and one
pass over the data. For each probe:

    error = Σ_outputs Σ_samples ‖y' - y‖² / Σ_outputs Σ_samples ‖y‖²

over the float outputs the graph computes: a relative squared error, additive over
independent small edits to first order, which is what a budget allocator sums.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import Probe
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.collect import Progress

logger = logging.getLogger(__name__)


def measure(
    model: ir.Model,
    probes: Sequence[Probe],
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    batch: int = 16,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Relative squared output error of each probe's edit alone, by ``Probe.key``; ``model``
    is not modified.

    Raises:
        ShrinkError: two probes share a key, or the model has no float output it computes.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    keys = [p.key for p in probes]
    if len(set(keys)) != len(keys):
        raise ShrinkError("probe: probe keys must be unique")
    base = model.clone()
    io.unshare_tensors(base)
    outputs = combined_mod.compared_outputs(base, "probe")
    sep = combined_mod.separator(base)
    errors: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        data = data_mod.replayable(dataset, stack)
        groups = [probes[i : i + batch] for i in range(0, len(probes), batch)]
        for index, group in enumerate(groups, 1):
            edits = [_applied(probe) for probe in group]
            combined = combined_mod.build(base, edits, outputs, sep, "probe")
            phase = f"probe {index}/{len(groups)}"
            measured = _stream(combined, group, len(outputs), sep, data, provider, progress, phase)
            errors.update(measured)
    logger.info("probe: %d edits measured in %d runs", len(probes), len(groups))
    return errors


def _applied(probe: Probe):
    def edit(copy: ir.Model) -> ir.Model:
        probe.edit(copy)
        return copy

    return edit


def _stream(
    combined: ir.Model,
    group: Sequence[Probe],
    count: int,
    sep: str,
    data: data_mod.Dataset,
    provider: str,
    progress: Progress | None,
    phase: str,
) -> dict[str, float]:
    """One pass over ``data``: Σ‖y' - y‖² / Σ‖y‖² per probe, in float64."""
    references = [v.name or "" for v in combined.graph.outputs[:count]]
    diff_sq = np.zeros(len(group))
    ref_sq = 0.0
    for _, result in combined_mod.stream(combined, data, provider, progress, phase):
        for name in references:
            ref = result[name].astype(np.float64)
            ref_sq += float(np.sum(ref * ref))
            for i in range(len(group)):
                diff = result[f"{name}{sep}{i}"].astype(np.float64) - ref
                diff_sq[i] += float(np.sum(diff * diff))
    scale = ref_sq if ref_sq > 0 else 1.0
    return {probe.key: float(d / scale) for probe, d in zip(group, diff_sq, strict=True)}
