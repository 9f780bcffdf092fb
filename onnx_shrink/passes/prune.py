"""``prune``: unstructured and N:M sparsity of MatMul, Gemm and Conv weights.

Every weight is handled in its *row view* ``R [outputs, reduction]``: one row per output,
the reduction axis (what the layer sums over) along the row, ordered so that groups of M
consecutive entries are the groups sparse tensor cores read:

    MatMul W [K, N]            R = W^T                       (K along the row)
    Gemm   B, transB=1 [N, K]  R = B
    Conv   W [M, C, *k]        R = moveaxis(W, 1, -1).reshape(M, -1)   (C fastest)

Importance: magnitude ``|R|``; Wanda ``|R| * ||x_c||_2`` with ``||x_c||`` the L2 norm of the
layer input's channel c over calibration rows (``channel_sqnorm``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.compiler.data_aware import DataAwarePass
from onnx_shrink.compiler.options import (
    check_options,
    option,
    pattern_names,
    refuse_inapplicable,
    warn_no_change,
    warn_unmatched,
    warn_unmatched_op_types,
)
from onnx_shrink.compiler.pass_results import NotedResult
from onnx_shrink.compiler.statistics import ChannelValues, Gram, Statistics, StatRequest
from onnx_shrink.passes import half_weights, refit_budget
from onnx_shrink.passes import reconstruct as refitting
from onnx_shrink.passes.prune_layers import PRUNABLE, Layer, find_layers
from onnx_shrink.passes.prune_masks import magnitude_keep, nm_keep, row_keep
from onnx_shrink.passes.quant import quantized_already

logger = logging.getLogger(__name__)

SPARSE_INDEX_BYTES = 8
"""ONNX sparse_initializer (COO) stores an int64 linear index per nonzero."""


def sparse_break_even(itemsize: int) -> float:
    """Sparsity above which COO storage is smaller than dense: a nonzero costs
    ``itemsize + 8`` bytes, a dense element ``itemsize``; fp32 2/3, fp16 0.8."""
    return 1.0 - itemsize / (itemsize + SPARSE_INDEX_BYTES)


# ---- the pass ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrunePass(DataAwarePass):
    """Zero weights of MatMul, Gemm and Conv layers by magnitude or activation-aware importance.

    Rules:

    1. Weights are float initializers of MatMul (``[K, N]``), Gemm (``transA=0``) and Conv;
       Constant-node weights are lifted to initializers first (IR >= 4); If/Loop/Scan bodies
       are visited. A weight shared by several layers is pruned once (its statistics summed);
       one also read by another op, or smaller than ``min_elements``, or ``exclude``d, is kept.
    2. Unstructured: ``method=magnitude`` zeroes exactly ``round(sparsity * size)`` weights of
       each layer (``scope=global``: of all layers pooled); ``method=wanda`` zeroes
       ``round(sparsity * K)`` of each output's K weights by ``|W| * ||x_c||``.
    3. ``nm="N:M"`` keeps N of every M consecutive weights along the reduction axis (K; for
       Conv the input channels at each kernel position), the 2:4 pattern of sparse tensor
       cores; a layer whose reduction length is not a multiple of M is kept.
    4. Only main-graph layers can get activation statistics: Wanda layers in bodies (or with
       no statistics) fall back to magnitude, logged. magnitude asks for no data unless
       ``reconstruct=on``.
    5. ``reconstruct``: refit kept weights of main-graph MatMul/Gemm layers by least squares
       to the original outputs (``reconstruct.refit``, Gram of the input); ``auto``: when the
       method already uses data (wanda). Conv is not refit: the statistics engine has no
       Gram of im2col patches.
    6. Weights are replaced in place with the same dtype and shape: the file never grows.
       ``storage=sparse|auto`` would write COO ``sparse_initializer``s above
       ``sparse_break_even`` (2/3 for fp32), but onnx_ir 1.1.0 cannot serialize them (serde
       TODO), so weights stay dense, logged; zeros still shrink the zipped file.
    """

    name: ClassVar[str] = "prune"
    rewrites_float_weights: ClassVar[bool] = True  # float ones only (compiler.pass_order)
    fits_weights_to_data: ClassVar[bool] = True  # wanda's choice, reconstruct's refit

    method: Literal["magnitude", "wanda"] = option(
        "magnitude",
        "importance: |W|, or |W| x input-channel L2 norm",
        choices=("magnitude", "wanda"),
    )
    sparsity: float = option(0.5, "fraction of weights zeroed (unstructured)", minimum=0, maximum=1)
    nm: str = option("", "semi-structured 'N:M' (e.g. 2:4) instead of unstructured sparsity")
    scope: Literal["layer", "global"] = option(
        "layer", "magnitude threshold per layer or over all layers", choices=("layer", "global")
    )
    reconstruct: Literal["auto", "on", "off"] = option(
        "auto",
        "least-squares refit of MatMul/Gemm (auto: with wanda)",
        choices=("auto", "on", "off"),
    )
    ridge: float = option(refitting.DEFAULT_RIDGE, "refit dampening x mean diag(G)", minimum=0)
    refit_seconds: float = option(
        300.0,
        "time the refit may take in all (it solves a system per output row: hours on large "
        "layers), shared among them: a wide layer's iterations are cut to its share, a layer "
        "whose share pays for too few stays pruned without a refit, with a warning "
        "(inf: no limit)",
        minimum=0,
        infinite=True,
    )
    min_elements: int = option(1024, "layers with fewer weights are kept dense", minimum=0)
    exclude_op_types: tuple[str, ...] = option((), "op types kept dense")
    exclude: tuple[str, ...] = option(
        (), "node or weight names, or regexes, kept dense", patterns=True
    )
    storage: Literal["dense", "sparse", "auto"] = option(
        "dense", "weight storage (see rule 6)", choices=("dense", "sparse", "auto")
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.sparsity >= 1:
            raise ValueError("sparsity=1 zeroes every weight: give a fraction below 1")
        refuse_inapplicable(
            self, {"sparsity": not self.nm}, f"nm={self.nm!r} fixes the sparsity of every group"
        )
        refuse_inapplicable(
            self,
            {"refit_seconds": self.refits, "ridge": self.refits},
            "there is no refit (reconstruct=on, or auto with method=wanda)",
        )
        if self.nm:
            n, m = self.pattern
            if not 0 < n < m:
                raise ValueError(f"nm={self.nm!r}: need 0 < N < M")
            if self.scope == "global":
                raise ValueError(
                    "nm fixes the sparsity of every group: scope=global does not apply"
                )
        if self.scope == "global" and self.method == "wanda":
            raise ValueError("scope=global compares magnitudes across layers: use method=magnitude")

    @property
    def pattern(self) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.nm)
        if match is None:
            raise ValueError(f"nm={self.nm!r} is not 'N:M'")
        return int(match[1]), int(match[2])

    @property
    def refits(self) -> bool:
        return self.reconstruct == "on" or (self.reconstruct == "auto" and self.method == "wanda")

    def excluded(self, node: ir.Node) -> bool:
        if node.op_type in self.exclude_op_types:
            return True
        names = (node.name or "", node.inputs[1].name or "")
        return any(pattern_names(p, s) for p in self.exclude for s in names)

    def _layers(self, model: ir.Model, skipped: list[str] | None = None) -> list[Layer]:
        half_weights.lift(model)  # apply puts back the float16 storage of each
        graph_edit.lift_constant_weights(
            model, size_limit=max(self.min_elements, 1), read_by=PRUNABLE
        )
        return find_layers(model, self.excluded, self.min_elements, skipped)

    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        result: list[StatRequest] = []
        for layer in self._layers(model):
            if not layer.in_main_graph(model):
                continue
            if self.method == "wanda":
                result += layer.stat_request("channel_sqnorm")
            if self.refits and layer.layout != "conv":
                result += layer.stat_request("gram")
        return list(dict.fromkeys(result))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Data-free settings run directly; the others need ``bind(statistics)``."""
        if self.requests(model):
            return super().call(model)
        return self.apply(model, Statistics(results={}, samples=0, source="none"))

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        self._warn_unmatched(model)
        try:
            return self._prune(model, stats)
        finally:
            half_weights.restore(model)

    def _warn_unmatched(self, model: ir.Model) -> None:
        """Exclusions that name nothing: a typo pruned what it meant to keep, unsaid."""
        warn_unmatched_op_types(model, f"{self.name}.exclude_op_types", self.exclude_op_types)
        if self.exclude:
            nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
            names = [n.name or "" for n in nodes]
            names += [n.inputs[1].name or "" for n in nodes if len(n.inputs) > 1 and n.inputs[1]]
            warn_unmatched(f"{self.name}.exclude", self.exclude, names, "node or weight name")

    def _prune(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        skipped: list[str] = []
        layers = self._layers(model, skipped)
        if not layers:
            already = quantized_already.note(model.graph)
            none = "no MatMul, Gemm or Conv"
            warn_no_change(self.name, "layer", skipped, none=none, note=already)
            return ir.passes.PassResult(model, False)
        global_keep = self._global_masks(layers) if self.scope == "global" else {}
        rows_report = []
        budget = self._refit_budget(layers, stats, global_keep) if self.refits else None
        already: list[str] = []  # layers whose weights the masks left as they were
        for layer in layers:
            keep = global_keep.get(id(layer))
            row = self._prune_layer(model, layer, stats, keep, budget, already)
            if row is not None:
                rows_report.append(row)
        if budget is not None:
            budget.warn()
        _log_table(rows_report)
        self._log_storage(rows_report)
        if not rows_report:
            if already:
                _warn_already_sparse(already)
            return ir.passes.PassResult(model, False)
        return NotedResult(model, True, note=_zeroed_note(rows_report))

    def _global_masks(self, layers: Sequence[Layer]) -> dict[int, np.ndarray]:
        scores = [np.abs(_array(layer).astype(np.float64)).ravel() for layer in layers]
        keep = magnitude_keep(np.concatenate(scores), self.sparsity)
        masks, start = {}, 0
        for layer, score in zip(layers, scores, strict=True):
            shape = layer.weight.const_value.shape.numpy()
            masks[id(layer)] = layer.rows(keep[start : start + score.size].reshape(shape))
            start += score.size
        return masks

    def _refit_budget(self, layers, stats, masks) -> refit_budget.RefitBudget:
        """``refit_seconds`` over the layers that will be refit, each expected from its mask
        where known (``masks``: scope=global), else from its shape and the share of inputs
        its rows keep (an N:M layer kept dense is none of them)."""
        expected = {}
        n, m = self.pattern if self.nm else (1.0 - self.sparsity, 1)
        for layer in layers:
            if layer.layout == "conv" or _gram_parts(layer, stats) is None:
                continue
            shape = layer.weight.const_value.shape.numpy()
            outputs, k = (shape[1], shape[0]) if layer.layout == "kn" else (shape[0], shape[1])
            if id(layer) in masks:
                expected[id(layer)] = refitting.solve_costs(masks[id(layer)])
            elif k % m == 0:
                expected[id(layer)] = refitting.uniform_costs(outputs, k, max(1, round(k * n / m)))
        return refit_budget.RefitBudget(self.refit_seconds, expected)

    def _prune_layer(
        self, model, layer: Layer, stats: Statistics, keep, budget, already: list[str]
    ) -> _Report | None:
        """Prune one layer and say what it became, or None where it stays as it was (its name
        added to ``already`` where its zeros already met the mask: a mel filterbank)."""
        original = _array(layer)
        rows = layer.rows(original.astype(np.float64))
        method, scale = self.method, None
        if method == "wanda":
            main = layer.in_main_graph(model)
            scale = _activation_scale(layer, stats, original.shape) if main else None
            if scale is None:
                where = "no statistics" if main else "in a subgraph"
                logger.info("prune: %s: %s, magnitude instead of wanda", layer.name, where)
                method = "magnitude"
        scores = np.abs(rows) if scale is None else np.abs(rows) * scale
        if keep is None:
            keep = self._keep(layer, scores, method)
            if keep is None:
                return None
        new_rows = np.where(keep, rows, 0.0)
        error = refit_error = None
        gram = _gram(layer, stats) if self.refits and layer.layout != "conv" else None
        allotment = budget.allot(id(layer), layer.name, keep) if gram is not None else None
        if allotment is not None:
            started = time.perf_counter()
            refitted = refitting.refit_measured(
                rows, keep, gram, self.ridge, iterations=allotment.iterations
            )
            new_rows, refit_error, error = refitted.rows, refitted.error, refitted.pruned_error
            budget.spent(allotment, time.perf_counter() - started)
        pruned = layer.unrows(new_rows, original.shape).astype(original.dtype)
        if np.array_equal(pruned, original):
            already.append(f"{layer.name} ({np.mean(original == 0):.1%} zero)")
            return None
        layer.weight.const_value = ir.tensor(pruned, name=layer.weight.name)
        return _Report(
            layer.name,
            layer.nodes[0].op_type,
            original.shape,
            method + (f" {self.nm}" if self.nm else ""),
            float(np.mean(original == 0)),
            float(np.mean(pruned == 0)),
            original.dtype.itemsize,
            error,
            refit_error,
        )

    def _keep(self, layer: Layer, scores: np.ndarray, method: str) -> np.ndarray | None:
        if self.nm:
            n, m = self.pattern
            if scores.shape[1] % m:
                logger.info(
                    "prune: %s kept dense: reduction length %d is not a multiple of %d",
                    layer.name,
                    scores.shape[1],
                    m,
                )
                return None
            return nm_keep(scores, n, m)
        if method == "wanda":
            return row_keep(scores, self.sparsity)
        return magnitude_keep(scores, self.sparsity)

    def _log_storage(self, reports: Sequence[_Report]) -> None:
        if self.storage == "dense":
            return
        above = [r for r in reports if r.after > sparse_break_even(r.itemsize)]
        if self.storage == "sparse" or above:
            logger.warning(
                "prune: storage=%s: %d of %d layers are above the sparse break-even, but "
                "onnx_ir cannot write sparse_initializer; weights stay dense",
                self.storage,
                len(above),
                len(reports),
            )


@dataclasses.dataclass(frozen=True)
class _Report:
    layer: str
    op: str
    shape: tuple[int, ...]
    method: str
    before: float
    after: float
    itemsize: int
    error: float | None  # relative output error on calibration data, pruned
    refit_error: float | None  # the same after the least-squares refit


def _array(layer: Layer) -> np.ndarray:
    return layer.weight.const_value.numpy()


def _activation_scale(layer: Layer, stats: Statistics, shape) -> np.ndarray | None:
    """``||x_c||_2`` laid out like the row view (Conv: tiled over kernel positions and picked
    per output's group), or None without statistics."""
    axis = 1 if layer.layout == "conv" else -1
    parts = [stats.get(n.inputs[0].name, "channel_sqnorm", axis=axis) for n in layer.nodes]
    if any(not isinstance(p, ChannelValues) for p in parts):
        return None
    norm = np.sqrt(sum(p.values for p in parts))
    if layer.layout != "conv":
        return norm[None, :] if norm.size == shape[0 if layer.layout == "kn" else 1] else None
    outputs, per_group = shape[0], shape[1]
    groups = norm.size // per_group
    if groups * per_group != norm.size or outputs % groups:
        return None
    group_of_row = np.arange(outputs) // (outputs // groups)
    channel = norm.reshape(groups, per_group)[group_of_row]  # [M, C/g]
    return np.tile(channel, (1, math.prod(shape[2:])))


def _gram(layer: Layer, stats: Statistics) -> np.ndarray | None:
    parts = _gram_parts(layer, stats)
    return None if parts is None else sum(p.matrix for p in parts)


def _gram_parts(layer: Layer, stats: Statistics) -> list[Gram] | None:
    """The Grams of the layer's nodes' inputs (a shared weight: several), None without one."""
    parts = [stats.get(n.inputs[0].name, "gram") for n in layer.nodes]
    if any(not isinstance(p, Gram) or p.rows == 0 for p in parts):
        return None
    return parts


def _zeroed_note(reports: Sequence[_Report]) -> str:
    """The summary's line: weights zeroed, as a share of the pruned layers' (stored dense,
    they change no count or size on disk, only the zipped size)."""
    total = sum(math.prod(r.shape) for r in reports)
    zeroed = sum(math.prod(r.shape) * r.after for r in reports)
    return f"{zeroed / total:.0%} of {total:,} weights in {len(reports)} layers are zero"


def _warn_already_sparse(layers: Sequence[str]) -> None:
    """Why nothing changed where every layer's zeros already met its mask: the summary's
    "(no change)" would not say."""
    logger.warning(
        "prune: no change: the weights of %d layer(s) already hold the zeros asked for: %s",
        len(layers),
        ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else ""),
    )


def _log_table(reports: Sequence[_Report]) -> None:
    if not reports:
        logger.info("prune: no layer was pruned")
        return
    lines = [f"{'layer':<48} {'op':<6} {'shape':<18} {'method':<14} sparsity  output err"]
    for r in reports:
        err = "" if r.error is None else f"{r.error:.2e} -> {r.refit_error:.2e} refit"
        lines.append(
            f"{r.layer[-48:]:<48} {r.op:<6} {'x'.join(map(str, r.shape)):<18} {r.method:<14} "
            f"{r.before:5.1%} -> {r.after:5.1%}  {err}"
        )
    zeroed = sum(math.prod(r.shape) * (r.after - r.before) for r in reports)
    lines.append(f"{len(reports)} layers, {zeroed:,.0f} weights zeroed (stored dense)")
    logger.info("prune:\n%s", "\n".join(lines))
