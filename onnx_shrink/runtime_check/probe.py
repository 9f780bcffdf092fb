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
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from onnx_shrink.runtime_check import sessions

logger = logging.getLogger(__name__)


def measure(
    model: ir.Model,
    probes: Sequence[Probe],
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    batch: int = 16,
    progress: sensitivity_mod.Progress | None = None,
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
    outputs = sensitivity_mod._compared_outputs(base)
    sep = sensitivity_mod._separator(base)
    errors: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        data = data_mod.replayable(dataset, stack)
        groups = [probes[i : i + batch] for i in range(0, len(probes), batch)]
        for index, group in enumerate(groups, 1):
            combined = _combined(base, group, outputs, sep)
            phase = f"probe {index}/{len(groups)}"
            measured = _stream(combined, group, len(outputs), sep, data, provider, progress, phase)
            errors.update(measured)
    logger.info("probe: %d edits measured in %d runs", len(probes), len(groups))
    return errors


def _combined(base: ir.Model, group: Sequence[Probe], outputs: list[int], sep: str) -> ir.Model:
    """The unedited graph (outputs ``<out>``) plus, per probe i, an edited copy (outputs
    ``<out><sep>i``), sharing inputs and unchanged initializers."""
    combined = base.clone()
    kept = [combined.graph.outputs[i] for i in outputs]
    combined.graph.outputs.clear()
    combined.graph.outputs.extend(kept)
    for index, probe in enumerate(group):
        copy = base.clone()  # shares its tensors with ``base``: one model's weights in memory
        probe.edit(copy)
        sensitivity_mod._merge(combined, copy, outputs, f"{sep}{index}")
    return combined


def _stream(
    combined: ir.Model,
    group: Sequence[Probe],
    count: int,
    sep: str,
    data: data_mod.Dataset,
    provider: str,
    progress: sensitivity_mod.Progress | None,
    phase: str,
) -> dict[str, float]:
    """One pass over ``data``: Σ‖y' - y‖² / Σ‖y‖² per probe, in float64."""
    session = sessions.create_session(large_tensors.session_source(combined), provider=provider)
    names = [o.name for o in session.get_outputs()]
    references = [v.name or "" for v in combined.graph.outputs[:count]]
    diff_sq = np.zeros(len(group))
    ref_sq = 0.0
    for done, batch in enumerate(data.batches(), 1):
        result = dict(zip(names, session.run(names, batch.feed), strict=True))
        for name in references:
            ref = result[name].astype(np.float64)
            ref_sq += float(np.sum(ref * ref))
            for i in range(len(group)):
                diff = result[f"{name}{sep}{i}"].astype(np.float64) - ref
                diff_sq[i] += float(np.sum(diff * diff))
        if progress is not None:
            progress(phase, done)
    scale = ref_sq if ref_sq > 0 else 1.0
    return {probe.key: float(d / scale) for probe, d in zip(group, diff_sq, strict=True)}
