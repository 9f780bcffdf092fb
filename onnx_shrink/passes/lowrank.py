"""``lowrank``: W -> A·B for MatMul, Gemm and 1x1 Conv by (activation-aware) truncated SVD.

For a layer y = x·W with W (K x N) and calibration inputs X (rows x K):

    G = XᵀX + λ·tr(XᵀX)/K·I = SᵀS         (S = Lᵀ from Cholesky; λ damps rank-deficient X)
    ‖X(W - AB)‖_F = ‖S(W - AB)‖_F          (exact at λ = 0)
    SW = UΣVᵀ -> A = S⁻¹U_r Σ_r^½, B = Σ_r^½ V_rᵀ   (Eckart-Young in the metric of G)
    ‖S(W - AB)‖_F² = Σ_{i>r} σ_i²          (every rank's output error is read off Σ)

Without data S = I: plain SVD, the error is the weight's. The refit solves
min_B ‖X(W - AB)‖ in the undamped G: B = (AᵀGA)⁻¹AᵀGW. x·A·B costs r(K+N) multiply-adds per
row against K·N, so a layer is split only when r < K·N/(K+N).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_shrink.compiler import graph_edit, walk
from onnx_shrink.compiler.data_aware import DataAwarePass, Edit, Probe, ProbeBudget
from onnx_shrink.compiler.options import check_options, option, refuse_inapplicable, warn_no_change
from onnx_shrink.compiler.statistics import ChannelValues, Gram, Statistics, StatRequest
from onnx_shrink.passes import half_weights, lowrank_report
from onnx_shrink.passes import lowrank_graph as graph_mod
from onnx_shrink.passes import lowrank_ranks as ranks_mod
from onnx_shrink.passes.lowrank_svd import Factorization, factorize, factors, refit
from onnx_shrink.passes.quant import log_cone, quantized_already

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's decision: the rank it gets, or why it stays dense."""

    node: str
    op_type: str
    shape: tuple[int, int]  # (K, N) of the weight as a matrix
    rank: int | None
    params_before: int
    params_after: int
    error: float | None  # predicted relative error of the output (data-free: of the weight)
    activation_aware: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class _Layer:
    node: ir.Node
    weight: np.ndarray  # K x N, as stored (float32 mostly: cast where computed with)
    factorization: Factorization
    gram: np.ndarray | None  # undamped XᵀX (for refit)
    rows: float  # rows of x per sample (the MAC weight of the layer)
    gram_rows: int | None = None  # the calibration rows XᵀX sums (None: no full Gram)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def dense(self) -> int:
        return self.weight.size

    def params(self, rank: int | None) -> int:
        return self.dense if rank is None else rank * sum(self.shape)

    def error(self, rank: int | None) -> float:
        """Relative squared error of rank ``rank`` (0 when dense), in the factorization's
        metric: of the output when whitened, else of the weight."""
        return ranks_mod.relative_error(self.factorization.tail_energy(), rank)

    def weight_error(self, rank: int | None) -> float:
        """Relative squared error of the weight itself at the best rank ``rank`` (plain SVD)."""
        return ranks_mod.relative_error(self.weight_tail, rank)

    @functools.cached_property
    def weight_tail(self) -> np.ndarray:
        """Tail energies of W's own spectrum (plain SVD's errors), computed when first read."""
        f = self.factorization
        weight = np.asarray(self.weight, np.float64)
        spectrum = f.s if not f.aware else np.linalg.svd(weight, compute_uv=False)
        return ranks_mod.tail_energy(spectrum)

    def ranks(self, multiple: int) -> list[int]:
        return ranks_mod.candidate_ranks(self.shape, multiple)


# A weight with at most this share of non-zeros was pruned: factorizing it loses its zeros.
SPARSE_SHARE = 0.75


@dataclasses.dataclass(frozen=True)
class LowRankPass(DataAwarePass):
    """Replace constant 2-D weights by low-rank products x·A·B where that saves MACs and bytes.

    Rules:

    1. MatMul with a constant 2-D weight, Gemm (transA, transB, alpha, beta, bias C) and Conv
       whose kernel is all 1s with group 1 (strides and pads stay on the first Conv) become two
       ops, x·A then ·B; the second keeps the node's name and output. Constant-node weights
       are lifted first. A weight shared by several nodes, a non-float one, a subgraph's and
       one under ``min_params`` stays as it is, with the reason logged.
    2. A layer is split only when its rank saves: r·(K+N) < K·N. Ranks are multiples of
       ``rank_multiple``.
    3. Ranks by ``selection``: ``energy`` keeps that share of Σσ², ``error`` the smallest rank
       within ``max_error`` relative output error, ``budget`` removes ``reduction`` of the
       targeted layers' parameters (or MACs) where it costs the least summed relative error.
       That error is the weight's (``budget_metric=weight``), the layer output's on
       calibration data (``output``), or the *model's* outputs' (``model-output``, the default;
       without measurements, as under ``bind`` with hand-made statistics, the weight's). Layer
       output errors compare badly across layers: a layer whose output has one outlier
       channel (BERT's FFN output, 99 % of ‖XW‖²) looks nearly free to cut, yet the model's
       output suffers, and no local statistic sees that MiniLM's last layer barely moves the
       output while its first ones move it most. So with ``model-output`` each layer alone is
       replaced at ``probe_ranks`` ranks and the model's relative squared output error is
       measured on the calibration data (``probes``; the pipeline runs them in one combined
       model), and the layer's own whitened curve is rescaled through those points. With
       ``held_out`` the factors measured are made from half of the calibration samples and
       measured on the other half (both ways): on the samples it was fitted to, a whitened
       factorization looks up to 10x better than on new ones (MiniLM's attention output
       projections), and a budget spent on those in-sample errors cuts exactly the layers
       that overfit most.
       The measurements take about ``probe_seconds`` at most (projected from the first
       runs, each layer's weighted by the nodes downstream of it): past it, the layers not
       yet measured keep the middle rank of their grid (at least), then its ends, and the
       curves are rescaled through the points measured, with a warning.
    4. ``activation_aware`` whitens by the Cholesky factor of each input's Gram matrix XᵀX
       (1x1 Conv: its diagonal, per-channel energies, as ASVD scales), so σ measure output
       error; without it (or without statistics for a layer) plain SVD of W. ``refit``
       re-solves B by least squares on the calibration inputs (it needs the Gram too).
    5. Each layer's rank, parameters and predicted error are logged as a table (``plan``
       returns the same decisions as data).
    """

    name: ClassVar[str] = "lowrank"
    rewrites_float_weights: ClassVar[bool] = True  # float ones only (compiler.pass_order)
    fits_weights_to_data: ClassVar[bool] = True  # factors fit to the data's Gram

    selection: Literal["energy", "error", "budget"] = option(
        "budget", "how ranks are chosen", choices=("energy", "error", "budget")
    )
    energy: float = option(0.95, "selection=energy: share of Σσ² kept", minimum=0.0, maximum=1.0)
    max_error: float = option(0.1, "selection=error: relative output error per layer", minimum=0.0)
    reduction: float = option(
        0.3, "selection=budget: share of parameters (or MACs) removed", minimum=0.0, maximum=1.0
    )
    budget_unit: Literal["params", "macs"] = option(
        "params", "selection=budget: what ``reduction`` counts", choices=("params", "macs")
    )
    budget_metric: Literal["weight", "output", "model-output"] = option(
        "model-output",
        "selection=budget: whose relative error the budget minimises: the weight's, the "
        "layer's calibration output's, or the model's outputs' as measured with each layer "
        "alone factorized (the factors are activation-aware in every case)",
        choices=("weight", "output", "model-output"),
    )
    probe_ranks: int = option(
        6, "budget_metric=model-output: ranks measured per layer (a geometric grid)", minimum=1
    )
    probe_seconds: float = option(
        300.0,
        "budget_metric=model-output: about the time the measurements may take; past it, "
        "fewer ranks per layer are measured (each layer's middle rank at least, then its "
        "grid's ends; inf: no limit). The statistics held_out needs, one collection per half "
        "of the samples, come on top",
        minimum=0.0,
        infinite=True,
    )
    held_out: bool = option(
        True,
        "budget_metric=model-output: measure each layer's factors out of sample (made from "
        "part of the calibration samples, measured on the rest), not on the samples they fit",
    )
    rank_multiple: int = option(8, "ranks are multiples of this (kernel efficiency)", minimum=1)
    activation_aware: bool = option(
        True, "whiten by the input Gram matrix from calibration (False: plain SVD, no data)"
    )
    refit: bool = option(False, "re-solve B by least squares on the calibration inputs")
    damping: float = option(
        1e-4, "Gram damping, relative to its mean diagonal (rank-deficient inputs)", minimum=0.0
    )
    op_types: tuple[str, ...] = option(("MatMul", "Gemm", "Conv"), "op types to split")
    min_params: int = option(4096, "weights with fewer elements stay dense", minimum=0)
    exclude: tuple[str, ...] = option((), "node names or regexes kept dense", patterns=True)
    log_inputs: bool = option(
        False,
        "also split weights whose output reaches a Log through linear ops (a log-mel "
        "filterbank), kept dense by default: a low-rank filterbank's energies can go negative",
    )
    only: tuple[str, ...] = option((), "split just these nodes (names or regexes)", patterns=True)

    def __post_init__(self) -> None:
        check_options(self)
        budget = self.selection == "budget"
        refuse_inapplicable(
            self,
            {
                "energy": self.selection == "energy",
                "max_error": self.selection == "error",
                "reduction": budget,
                "budget_unit": budget,
                "budget_metric": budget,
            },
            f"selection={self.selection!r} does not read it",
        )
        unknown = set(self.op_types) - {"MatMul", "Gemm", "Conv"}
        if unknown:
            raise ValueError(f"op_types={sorted(unknown)!r}: only MatMul, Gemm and Conv split")

    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        self._lift_weights(model)  # apply puts back the float16 storage of each
        if not (self.activation_aware or self.refit):
            return []
        found = [self._stat_request(n) for n, reason in self._candidates(model) if not reason]
        return list(dict.fromkeys(r for r in found if r is not None))

    def probes(self, model: ir.Model, stats: Statistics) -> Sequence[Probe]:
        """With ``budget_metric=model-output`` and two layers or more: each layer (known by
        ``_layer_key``) alone replaced by its factors at ``probe_ranks`` ranks of a geometric grid
        (remade from other statistics with ``held_out``). Nothing is factorized until an
        edit is made (``_ProbeFactors``)."""
        if not self._measures_model():
            return []
        self._lift_weights(model)
        counts = collections.Counter(node.name for node in model.graph)
        nodes = [node for node, reason in self._candidates(model) if not reason]
        if len(nodes) < 2:  # one layer's rank is fixed by the budget: nothing to weigh
            return []
        factors = _ProbeFactors(self)
        result = []
        for node in nodes:
            name = _layer_key(node, counts)
            # A unique node name lets the copy hold only what is downstream of the layer;
            # without one (an unnamed node, as old torch exports have), the whole model.
            anchors = (node.name,) if node.name and counts[node.name] == 1 else ()
            request = self._stat_request(node) if self.held_out else None
            ranks = ranks_mod.candidate_ranks(graph_mod.matrix_shape(node), self.rank_multiple)
            grid = ranks_mod.probe_grid(ranks, self.probe_ranks)
            for rank, priority in zip(grid, ranks_mod.grid_priorities(len(grid)), strict=True):
                edit = functools.partial(factors.split, node=node, stats=stats, rank=rank)
                key = _probe_key(name, rank)
                remade = functools.partial(factors.edit, node, rank=rank) if request else None
                requests = (request,) if request else ()
                result.append(Probe(key, edit, remade, requests, anchors, priority))
        return result

    def probe_budget(self) -> ProbeBudget | None:
        if not self._measures_model() or math.isinf(self.probe_seconds):
            return None
        return ProbeBudget(self.probe_seconds, "lowrank.probe_seconds")

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        graph_mod.warn_unmatched_patterns(model, self.exclude, self.only)
        self._lift_weights(model)
        try:
            return self._split(model, stats)
        finally:
            half_weights.restore(model)  # the factors of a half weight are stored as it was

    def _split(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        layers, plans = self._plan(model, stats)
        sparse = []
        for layer, plan in zip(layers, plans, strict=False):
            if plan.rank is not None:
                if np.count_nonzero(layer.weight) <= SPARSE_SHARE * layer.weight.size:
                    sparse.append(layer.node.name or layer.node.op_type)
                graph_mod.split(model.graph, layer.node, *self._factors(layer, plan.rank))
        if sparse:  # pruned, or sparse as trained (a mel filterbank): the factors are dense
            logger.warning(
                "lowrank: %d split weight(s) were mostly zeros, and their factors are dense: "
                "%s; where prune made the zeros, put prune after lowrank to keep them",
                len(sparse),
                ", ".join(sparse[:5]),
            )
        lowrank_report.log_table(plans)
        modified = any(p.rank is not None for p in plans)
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        else:
            none = graph_mod.none_reason(model, self.op_types, self.only)
            already = quantized_already.note(model.graph)
            reasons = [p.reason for p in plans]
            warn_no_change(self.name, "layer", reasons, none=none, note=already)
        return ir.passes.PassResult(model, modified)

    def plan(self, model: ir.Model, stats: Statistics | None = None) -> list[LayerPlan]:
        """The decisions ``apply`` would take, one per layer considered (model not rewritten,
        except that Constant-node weights are lifted to initializers)."""
        graph_edit.lift_constant_weights(model, read_by=self.op_types)
        with half_weights.lifted(model):
            return self._plan(model, stats or Statistics({}, 0, "none"))[1]

    def _lift_weights(self, model: ir.Model) -> None:
        """Constant-node weights to initializers, and float16 weights behind a Cast (as
        ``half_weights`` lifts them) to the float32 constants they are: both are splittable."""
        graph_edit.lift_constant_weights(model, read_by=self.op_types)
        half_weights.lift(model)

    def _measures_model(self) -> bool:
        return (
            self.selection == "budget"
            and self.budget_metric == "model-output"
            and self.activation_aware
        )

    def _factors(self, layer: _Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = factors(layer.factorization, rank)
        if self.refit and layer.gram is not None:
            b = refit(np.asarray(layer.weight, np.float64), a, layer.gram)
        return a, b

    def _plan(self, model: ir.Model, stats: Statistics) -> tuple[list[_Layer], list[LayerPlan]]:
        layers, skipped = self._layers(model, stats)
        ranks = self._ranks(layers, stats.probe_errors)
        plans = [self._layer_plan(layer, rank) for layer, rank in zip(layers, ranks, strict=True)]
        return layers, plans + skipped

    def _layers(self, model: ir.Model, stats: Statistics) -> tuple[list[_Layer], list[LayerPlan]]:
        """The layers to rank, and the plans of the nodes skipped."""
        layers: list[_Layer] = []
        skipped: list[LayerPlan] = []
        for node, reason in self._candidates(model):
            if reason:
                skipped.append(_dense_plan(node, reason))
                continue
            layers.append(self._layer(node, stats))
        if self.activation_aware:
            lowrank_report.warn_few_rows(layers)
        return layers, skipped

    def _candidates(self, model: ir.Model) -> list[tuple[ir.Node, str]]:
        """(node, reason to skip or "") for every node of ``op_types`` in the main graph."""
        opset = walk.onnx_opset(model)
        result = []
        for node in model.graph:
            if node.op_type not in self.op_types or node.domain not in ("", "ai.onnx"):
                continue
            if self.only and not graph_mod.matches(node, self.only):
                continue
            reason = graph_mod.check(node, opset) or self._size_reason(node)
            if not reason and graph_mod.matches(node, self.exclude):
                reason = "excluded"
            if not reason and not self.log_inputs and log_cone.feeds_log(node):
                reason = log_cone.reason(self.name, log_cone.LOW_RANK_HARM, "splits")
            if reason:
                logger.debug("lowrank: skipping %s (%s): %s", node.name, node.op_type, reason)
            result.append((node, reason))
        nested = sum(1 for g in model.graph.subgraphs() for n in g if n.op_type in self.op_types)
        if nested:
            logger.info("lowrank: %d nodes inside If/Loop/Scan bodies are not visited", nested)
        return result

    def _size_reason(self, node: ir.Node) -> str:
        k, n = graph_mod.matrix_shape(node)
        if k * n < self.min_params:
            return f"weight {k}x{n} is under min_params={self.min_params}"
        if not ranks_mod.candidate_ranks((k, n), self.rank_multiple):
            return f"no rank of {self.rank_multiple}s below break-even {k * n / (k + n):.1f}"
        return ""

    def _stat_request(self, node: ir.Node) -> StatRequest | None:
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return None  # x is K x M: its last axis is not the weight's input axis
        if node.op_type == "Conv":  # channels are axis 1: only their energies, not XᵀX
            return StatRequest(node.inputs[0].name, "channel_sqnorm", axis=1)
        return StatRequest(node.inputs[0].name, "gram")

    def _layer(self, node: ir.Node, stats: Statistics) -> _Layer:
        weight = graph_mod.weight_matrix(node, dtype=None)
        request = self._stat_request(node) if (self.activation_aware or self.refit) else None
        stat = stats.get(request.tensor, request.kind, axis=request.axis) if request else None
        gram = None
        if isinstance(stat, Gram) and stat.matrix.shape == (weight.shape[0],) * 2:
            gram = stat.matrix
        elif isinstance(stat, ChannelValues) and stat.values.shape == (weight.shape[0],):
            gram = np.diag(stat.values)
        if (self.activation_aware or self.refit) and gram is None:
            logger.warning("lowrank: no input statistics for %s; plain SVD", node.name)
        rows = (
            stat.rows / max(stats.samples, 1) if stat is not None else graph_mod.static_rows(node)
        )
        f = factorize(weight, gram if self.activation_aware else None, self.damping)
        gram_rows = stat.rows if isinstance(stat, Gram) and stat.matrix is gram else None
        return _Layer(node, weight, f, gram, rows, gram_rows)

    def _ranks(self, layers: Sequence[_Layer], measured: Mapping[str, float]) -> list[int | None]:
        if self.selection == "budget":
            metric = self.budget_metric
            if metric == "model-output" and not (self.activation_aware and measured):
                if self.activation_aware and len(layers) > 1:  # else nothing to measure
                    logger.warning("lowrank: no model-output measurements; budget_metric=weight")
                metric = "weight"
            graph = layers[0].node.graph if layers else None
            counts = collections.Counter(n.name for n in graph or ())
            errors = [
                _curve(layer, self.rank_multiple, metric, measured, counts) for layer in layers
            ]
            return ranks_mod.allocate_layers(
                layers, errors, self.reduction, self.budget_unit, self.rank_multiple
            )
        keep = self.energy if self.selection == "energy" else 1.0 - self.max_error**2
        return [
            ranks_mod.threshold_rank(
                layer.factorization.tail_energy(),
                keep,
                self.rank_multiple,
                layer.ranks(self.rank_multiple),
            )
            for layer in layers
        ]

    def _layer_plan(self, layer: _Layer, rank: int | None) -> LayerPlan:
        k, n = layer.shape
        reason = "" if rank is not None else f"needed rank reaches break-even {k * n / (k + n):.1f}"
        if rank is None and self.selection == "budget":
            reason = "the budget left it dense"
        aware = layer.factorization.aware
        error = math.sqrt(layer.error(rank))
        name, op, params = layer.node.name or "", layer.node.op_type, layer.params(rank)
        return LayerPlan(name, op, (k, n), rank, layer.dense, params, error, aware, reason)


class _ProbeFactors:
    """The probes' edits, each factorized when it is made (``Probe.edit`` from the pass's
    statistics, ``Probe.remade`` from a block's): the last layer's factorization is kept for
    its other ranks, so probing holds one layer's at a time, and with ``held_out`` the full
    statistics' are made only by ``apply``. The statistics it came from are referenced
    weakly: a held-out block's (1.8 GB of Grams on a 0.6 GB encoder) are freed when the
    block is done, not kept until the next block's are collected."""

    def __init__(self, pass_: LowRankPass) -> None:
        self._pass = pass_
        self._last: tuple[ir.Node, weakref.ref[Statistics], _Layer] | None = None

    def edit(self, node: ir.Node, stats: Statistics, rank: int) -> Edit:
        last = self._last
        if last is None or last[0] is not node or last[1]() is not stats:
            last = self._last = (node, weakref.ref(stats), self._pass._layer(node, stats))
        a, b = self._pass._factors(last[2], rank)
        return functools.partial(graph_mod.split_computing, output=node.outputs[0].name, a=a, b=b)

    def split(self, model: ir.Model, node: ir.Node, stats: Statistics, rank: int) -> None:
        self.edit(node, stats, rank)(model)


def _curve(
    layer: _Layer,
    multiple: int,
    metric: str,
    measured: Mapping[str, float],
    counts: Mapping[str | None, int],
) -> np.ndarray:
    """The layer's error at each option (its ranks, then dense) in ``metric`` (``counts``:
    the graph's node names, for ``_layer_key``)."""
    options = [*layer.ranks(multiple), None]
    if metric == "weight":
        return np.array([layer.weight_error(r) for r in options])
    local = np.array([layer.error(r) for r in options])
    if metric == "output":
        return local
    name = _layer_key(layer.node, counts)
    points = {r: measured[_probe_key(name, r)] for r in options if _probe_key(name, r) in measured}
    if not points:
        logger.warning(
            "lowrank: no measured curve for %r; its output error counts as is",
            layer.node.name or name,
        )
    local_at = {r: layer.error(r) for r in points}
    ranks = [r if r is not None else 0 for r in options]  # dense: local error 0, stays 0
    return ranks_mod.scale_by_measured(ranks, local, points, local_at)


def _layer_key(node: ir.Node, counts: Mapping[str | None, int]) -> str:
    """What a layer's probes are known by: its node's name where unique (``counts``: the
    graph's node names), else the name of the value it computes (unique in the graph and
    the same in every copy: an unnamed node, as old torch exports have, is measured too)."""
    if node.name and counts[node.name] == 1:
        return node.name
    return node.outputs[0].name or ""


def _probe_key(name: str, rank: int | None) -> str:
    return f"lowrank:{name}@{rank}"


def _dense_plan(node: ir.Node, reason: str) -> LayerPlan:
    """A skipped node's plan; its shape is (0, 0) unless its weight is a valid matrix."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    params = weight.size if weight is not None else 0
    valid = weight is not None and not graph_mod.check(node, 99)
    shape = graph_mod.matrix_shape(node) if valid else (0, 0)
    return LayerPlan(
        node.name or "", node.op_type, shape, None, params, params, None, False, reason
    )
