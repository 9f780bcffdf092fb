"""Dynamic quantization: int8 MatMul/Gemm/Gather/LSTM weights, activations quantized at run
time; GRU, RNN and ConvTranspose weights, and tables read by Slice or Reshape, stored as int8.

Weights are quantized symmetrically, per output column ``n`` (or per tensor):
``s[n] = max_k |W[k, n]| / 127``, ``Wq = round(W / s)`` in [-127, 127], ``W ~ Wq * s``.
At run time onnxruntime quantizes the activation to uint8 (``DynamicQuantizeLinear``: range of
the whole tensor, widened to contain 0), multiplies in integers and rescales:
``Y = ((Aq - za) @ Wq) * (sa * s) + bias``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Collection
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, tied_weights
from onnx_shrink.compiler.options import check_options, option, warn_unmatched_exclusions
from onnx_shrink.passes import half_weights
from onnx_shrink.passes.quant import compact, log_cone, recurrent, stored_int8, table_readers
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, quantize_weight
from onnx_shrink.passes.quant.weight_matching import (
    MS_DOMAIN,
    LinearMatch,
    WeightContext,
    check_selection,
    derived_name,
    gather_reason,
    match_linear,
    trimmed,
)
from onnx_shrink.passes.quant.weight_warnings import half_precision_left, warn_float_convs

logger = logging.getLogger(__name__)

PER_RUN_SCALES = frozenset(
    {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"}
)
"""Ops that take one int8 scale per run from every sample in it (this pass's): samples run
together share it, so each one's outputs depend on its batch-mates."""


def per_run_nodes(model: ir.Model) -> collections.Counter[str]:
    """The ``PER_RUN_SCALES`` nodes of ``model``, in every graph, by op type."""
    return collections.Counter(
        node.op_type for graph in model.graphs() for node in graph if node.op_type in PER_RUN_SCALES
    )


SUPPORTED_OPS = (
    "MatMul",
    "Gemm",
    "Gather",
    "LSTM",
    "GRU",
    "RNN",
    "ConvTranspose",
    *table_readers.TABLE_READERS,
)

CONV_LEFT_FLOAT = (
    "; quant-dynamic takes no Conv: onnxruntime runs a dynamically quantized Conv as "
    "ConvInteger, slower than float"
)
"""Why quant-dynamic leaves Conv float, for ``warn_float_convs``"""
INT8 = QUANT_TYPES["s8"]


@dataclasses.dataclass(frozen=True)
class QuantDynamicPass(ir.passes.InPlacePass):
    """Quantize constant MatMul/Gemm/Gather/LSTM weights to int8 for dynamic (run-time)
    quantization, and store GRU/RNN/ConvTranspose weights and Slice/Reshape tables as int8.

    Rules:

    1. ``MatMul(A, W)`` with ``W`` a 2-D float32 initializer [K, N] becomes
       ``com.microsoft.DynamicQuantizeMatMul(A, Wq, s)``, onnxruntime's fused CPU kernel. A
       following ``Add(Y, b)`` with a constant ``b`` of shape [N] is folded into its ``bias``.
    2. ``Gemm(A, W, C)`` (``transA=0``) becomes the same node on ``alpha * op(W)`` (``op``
       transposes when ``transB=1``) and ``bias = beta * C``; a ``C`` that varies along
       rows (or is not constant) leaves the Gemm float.
    3. ``Gather(W, ids, axis=0)`` becomes ``DequantizeLinear(Gather(Wq, ids), s, axis=-1)``:
       only the gathered rows are dequantized (one scale per tensor below opset 13).
    4. With ``fused=False`` rules 1-2 emit standard ONNX instead (opset >= 11), which
       onnxruntime fuses back into rule 1's kernel when it loads the model:
       ``DynamicQuantizeLinear(A) -> MatMulInteger -> Cast -> Mul(sa * s) [-> Add(bias)]``.
       LSTMs then get rule 9's stored weights: standard ONNX has no integer LSTM.
    5. Skipped, with a debug log: nodes matched by ``exclude``, weights that are not float32
       initializers (or are graph inputs, so callers may override them), weights under
       ``min_weight_elements``, MatMuls and Gemms whose output reaches a Log through linear
       ops unless ``log_inputs`` (``log_cone``: the run-time range of a power spectrum fits
       its loud bins only). Model-local functions hold no initializers: skipped, logged.
    6. A weight shared by several rewritten nodes is quantized once; the float initializer
       stays as long as any other node (or a graph output) still reads it.
    7. If/Loop/Scan bodies are rewritten like the main graph; quantized initializers go to the
       graph that held the float weight, so outer-scope weights stay outer-scope.
    8. With ``narrow_storage``, per-channel scales are rounded up to float16 values before the
       weights are quantized, and every graph's constants are stored in the narrowest type
       that holds them exactly (``compact.store_narrow``).
    9. ``LSTM`` with constant W and R becomes ``com.microsoft.DynamicQuantizeLSTM``, its
       weights int8 per gate row (``recurrent``). GRU and RNN, which have no integer kernel
       in onnxruntime, and an LSTM the contrib op cannot take (``layout=1``, or
       ``fused=False``), keep computing in float on weights *stored* as int8 per gate row:
       ``Cast`` and ``Mul`` by the scales, which onnxruntime folds into float weights when it
       loads the model (``recurrent.store_int8``): a quarter of the bytes, the same speed.
    10. ``ConvTranspose``, which has no integer kernel on onnxruntime's CPU either, keeps
        computing in float on a weight stored so, per output channel (``stored_int8``).
        Conv stays float: onnxruntime runs a dynamically quantized one as ConvInteger,
        slower than float (``quant`` takes it, calibrated).
    11. A table, a constant float32 initializer only ``Slice`` or ``Reshape`` read as data
        (a positional encoding), is stored so too, per entry of its last axis
        (``stored_int8``). A Slice or Reshape of an activation is no candidate.
    """

    name: ClassVar[str] = "quant-dynamic"
    quantizes_weights: ClassVar[bool] = True  # leaves integer codes (compiler.pass_order)

    op_types: tuple[str, ...] = option(
        SUPPORTED_OPS, f"op types to quantize, of {', '.join(SUPPORTED_OPS)}"
    )
    exclude: tuple[str, ...] = option(
        (), "node names or regular expressions (full match) to leave in float", patterns=True
    )
    per_channel: bool = option(
        True,
        "one scale per output column (MatMul/Gemm), embedding dim, LSTM/GRU/RNN gate row or "
        "ConvTranspose output channel or table feature",
    )
    min_weight_elements: int = option(4096, "weights with fewer elements stay float", minimum=0)
    graphs: Literal["all", "subgraphs"] = option(
        "all",
        "where to quantize: every graph, or only If/Loop/Scan bodies",
        choices=("all", "subgraphs"),
    )
    fused: bool = option(
        True,
        "emit com.microsoft.DynamicQuantizeMatMul; false: standard ONNX DynamicQuantizeLinear +"
        " MatMulInteger (portable; onnxruntime fuses it to the same kernel)",
    )
    narrow_storage: bool = option(
        True,
        "per-channel scales rounded up to float16 values, and constants stored in the "
        "narrowest type that holds them exactly read through a Cast (quant's rule 7)",
    )
    log_inputs: bool = option(
        False,
        "also quantize MatMuls and Gemms whose output reaches a Log through linear ops (a "
        "log-mel front end's filterbank), kept float by default: int8's even steps erase the "
        "small values a Log spreads out",
    )

    @property
    def writes_qdq(self) -> bool:
        """Whether the result holds standard Q/DQ nodes at the model's opset (fused=False,
        and a Gather's DequantizeLinear either way): ``shrink`` asks onnxruntime beforehand
        whether it runs them there."""
        return not self.fused or "Gather" in self.op_types

    def __post_init__(self) -> None:
        check_options(self)
        check_selection(self.op_types, SUPPORTED_OPS)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        warn_unmatched_exclusions(model, self.name, self.exclude)
        lifted = graph_edit.lift_constant_weights(model, read_by=self.op_types)
        lifted |= tied_weights.materialize(model)  # drop_dead_weights puts back those left float
        with half_weights.lifted(model):  # those left float are put back
            context = self.context(model)
            count = self.quantize(model, context)
        if not count:
            context.warn_nothing_quantized(self.op_types)
        else:
            if self.narrow_storage:
                compact.store_narrow(model)
            warn_float_convs(model, self.name, CONV_LEFT_FLOAT)
            half_precision_left(model, self.name, self.op_types)
        return ir.passes.PassResult(model, count > 0 or lifted)

    def context(
        self, model: ir.Model, owner: str | None = None, *, quiet: bool = False
    ) -> WeightContext:
        """One run's weight context (``quiet``: a look that logs no skip); ``owner``: the
        pass named in what it logs and in its reasons (None: this one; ``quant`` runs this
        pass for what calibration cannot reach)."""
        return WeightContext.of(
            model, owner or self.name, self.exclude, self.min_weight_elements, quiet=quiet
        )

    def quantize(
        self,
        model: ir.Model,
        context: WeightContext | None = None,
        nodes: Collection[ir.Node] | None = None,
        owner: str | None = None,
    ) -> int:
        """Rules 1-7, and rule 8's float16 scales but not its storage; the number of nodes
        quantized. ``quant`` quantizes what its statistics cannot reach with this, then stores
        the whole model narrow once; with ``nodes``, only those (``quant.only``: the
        sensitivity report measures such a node alone). ``owner``: the pass named in what is
        logged (None: this one)."""
        context = context or self.context(model, owner)
        count = 0
        for node in self._selected(model, context, nodes):
            if node.op_type == "Gather":
                count += self._try_quantize_gather(context, node)
            elif node.op_type in recurrent.RECURRENT:
                count += self._try_quantize_recurrent(context, node)
            elif node.op_type in stored_int8.STORED_OPS:
                count += self._try_store(context, node)
            else:
                count += self._try_quantize_linear(context, node)
        context.drop_dead_weights()
        if count or owner is None:  # quant asks once per op type: its zeros said nothing
            logger.info("%s: quantized %d nodes", owner or self.name, count)
        return count

    def _selected(
        self, model: ir.Model, context: WeightContext, nodes: Collection[ir.Node] | None
    ) -> list[ir.Node]:
        """The candidates in the graphs ``graphs`` selects, among ``nodes`` (if given)."""
        return [
            node
            for node in context.candidates(self.op_types)
            if not (self.graphs == "subgraphs" and node.graph is model.graph)
            and (nodes is None or node in nodes)
        ]

    def layers(self, model: ir.Model, nodes: Collection[ir.Node] | None = None) -> list[ir.Node]:
        """The nodes ``quantize`` would rewrite (among ``nodes``, if given); reads ``model``
        only."""
        context = self.context(model)
        return [
            node
            for node in self._selected(model, context, nodes)
            if self._reason(context, node) is None
        ]

    def float_reasons(self, model: ir.Model, owner: str | None = None) -> dict[ir.Node, str]:
        """Why each node of ``op_types`` in the graphs ``graphs`` selects stays float, by what
        each rule checks (those ``exclude`` names are the caller's to explain); reads
        ``model`` only. ``owner``: the pass whose options the reasons name (None: this one)."""
        context = self.context(model, owner, quiet=True)
        reasons = {}
        for node in table_readers.weight_nodes(model, self.op_types):
            if self.graphs == "subgraphs" and node.graph is model.graph:
                continue
            reason = self._reason(context, node)
            if reason is not None:
                reasons[node] = reason
        return reasons

    def _reason(self, context: WeightContext, node: ir.Node) -> str | None:
        """Why ``node``, a candidate, stays float (what each rule checks before it
        rewrites), or None."""
        if node.op_type == "Gather":
            reason = gather_reason(context, node)
            if reason is None and context.opset < 10:
                reason = f"DequantizeLinear needs opset >= 10, not {context.opset}"
            return reason
        if node.op_type in recurrent.RECURRENT:
            return recurrent.rewrite_for(context, node, self.fused)[1]
        if node.op_type in stored_int8.STORED_OPS:
            return stored_int8.reason(context, node)
        match = self._linear_match(context, node)
        return match if isinstance(match, str) else None

    def _linear_match(self, context: WeightContext, node: ir.Node) -> LinearMatch | str:
        if not self.fused and context.opset < 11:
            return f"fused=False needs opset >= 11, not {context.opset}"
        match = match_linear(context, node)
        # After the match: a node that could not be quantized anyway is told why, and the
        # cone's walk runs only for weights that would be quantized (as quant-weight checks).
        if not isinstance(match, str) and not self.log_inputs and log_cone.feeds_log(node):
            return log_cone.reason(context.pass_name)
        return match

    def _try_quantize_linear(self, context: WeightContext, node: ir.Node) -> bool:
        match = self._linear_match(context, node)
        if isinstance(match, str):
            return context.skip(node, match)
        key = ("int8", match.transposed, match.alpha, self.per_channel)
        axis = 1 if self.per_channel else None
        codes, scale = context.weights(
            match.weight, key, lambda w: self._int8(match.prepare(w), axis)
        )
        assert codes is not None and scale is not None
        bias = context.constant(node, "bias", match.bias)
        if self.fused:
            inputs = trimmed(match.activation, codes, scale, None, bias)
            name = derived_name(node, "quant")
            nodes = [ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=name)]
        else:
            nodes = _integer_matmul(node, match.activation, codes, scale, bias)
        context.replace(match.replaced, nodes)
        return True

    def _try_quantize_recurrent(self, context: WeightContext, node: ir.Node) -> bool:
        how, reason = recurrent.rewrite_for(context, node, self.fused)
        if reason is not None:
            return context.skip(node, reason)
        how(context, node, per_channel=self.per_channel, narrow_storage=self.narrow_storage)
        return True

    def _try_store(self, context: WeightContext, node: ir.Node) -> bool:
        """Rules 10 and 11: a ConvTranspose's weight or a table, stored as int8."""
        reason = stored_int8.reason(context, node)
        if reason is not None:
            return context.skip(node, reason)
        stored_int8.store(
            context, node, per_channel=self.per_channel, narrow_storage=self.narrow_storage
        )
        return True

    def _int8(self, w: np.ndarray, axis: int | None) -> dict[str, np.ndarray]:
        """int8 codes of ``w`` and its scales (one per slice along ``axis``, or one)."""
        rounding = compact.scale_rounding(self.narrow_storage, axis)
        q = quantize_weight(w, INT8, axis=axis, scale_rounding=rounding)
        return {"int8": q.values, "scale": q.scale}

    def _try_quantize_gather(self, context: WeightContext, node: ir.Node) -> bool:
        reason = self._reason(context, node)
        if reason is not None:
            return context.skip(node, reason)
        # Per-axis DequantizeLinear (and a negative axis) exists from opset 13 on.
        per_channel = self.per_channel and context.opset >= 13
        axis = -1 if per_channel else None
        data = node.inputs[0]
        assert data is not None
        codes, scale = context.weights(
            data, ("int8-rows", per_channel), lambda w: self._int8(w, axis)
        )
        gather = ir.node(
            "Gather", [codes, node.inputs[1]], {"axis": 0}, name=derived_name(node, "int8")
        )
        dequantize = ir.node(
            "DequantizeLinear",
            [gather.outputs[0], scale],
            {"axis": -1} if per_channel else None,
            name=derived_name(node, "dequant"),
        )
        context.replace([node], [gather, dequantize])
        return True


def _integer_matmul(
    node: ir.Node, activation: ir.Value, codes: ir.Value, scale: ir.Value, bias: ir.Value | None
) -> list[ir.Node]:
    """``Y = Cast(MatMulInteger(Aq, Wq, za)) * (sa * s) [+ bias]`` in standard ONNX."""
    dql = ir.node(
        "DynamicQuantizeLinear", [activation], num_outputs=3, name=derived_name(node, "quant_a")
    )
    a_codes, a_scale, a_zero = dql.outputs
    matmul = ir.node("MatMulInteger", [a_codes, codes, a_zero], name=derived_name(node, "int"))
    to_float = ir.node("Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT})
    scales = ir.node("Mul", [a_scale, scale])
    rescale = ir.node("Mul", [to_float.outputs[0], scales.outputs[0]])
    nodes = [dql, matmul, to_float, scales, rescale]
    if bias is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias]))
    return nodes
