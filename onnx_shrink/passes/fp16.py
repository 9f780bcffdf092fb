"""Float16 / bfloat16 conversion with float islands chosen from calibration ranges."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, walk
from onnx_shrink.compiler.data_aware import DataAwarePass
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.compiler.options import (
    check_options,
    option,
    pattern_names,
    warn_no_change,
    warn_unmatched_exclusions,
    warn_unmatched_op_types,
)
from onnx_shrink.compiler.statistics import Statistics, StatRequest
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes import fp16_islands, fp16_types, fp16_worth, half_weights
from onnx_shrink.passes.quant import log_cone

logger = logging.getLogger(__name__)

FLOAT = ir.DataType.FLOAT
_FLOATS = frozenset({FLOAT})
# Small on purpose. CumSum accumulates; TopK and RoiAlign turn rounding into other indices
# and boxes (in onnxruntime's fp16 block list too); RandomNormal/RandomUniform in float16 fail
# on onnxruntime CPU (no kernel, no input to cast around). Range, NonMaxSuppression and
# ai.onnx.ml ops need no listing: their schemas have no float16 (rule 3 c).
DEFAULT_BLOCK_OPS = ("CumSum", "RandomNormal", "RandomUniform", "RoiAlign", "TopK")

# Ops whose float output type comes from an attribute or a body, not from a typed input.
_TYPED_BY_ATTRIBUTE = {"If", "Loop", "Scan", "Cast", "Constant", "ConstantOfShape"}
_TYPED_BY_ATTRIBUTE |= fp16_types.DTYPE_ATTRIBUTE_OPS

# Inputs that keep float32 though their type variable allows the target: Resize's roi is crop
# coordinates (float16 would round them) that no output's type depends on, and a converted
# roi, cast back up by onnxruntime's CPU provider, makes its NHWC layout transform permute
# an empty tensor: PP-OCRv4 det after fold,quant,fp16 failed on every run.
_KEPT_FLOAT_INPUTS = {"Resize": frozenset({1})}


class _Format(NamedTuple):
    dtype: ir.DataType
    type_str: str
    largest: float  # largest finite value
    tiny: float  # below this a nonzero |x| keeps fewer than 8 significant bits


FORMATS = {
    "float16": _Format(ir.DataType.FLOAT16, "tensor(float16)", 65504.0, 2.0**-17),
    "bfloat16": _Format(ir.DataType.BFLOAT16, "tensor(bfloat16)", 3.3895313892515355e38, 2.0**-126),
}


_KIND_WORDS = {
    "schema": "no {dtype} in the op's schema",
    "block_ops": "op in block_ops",
    "exclude": "excluded by name",
    "function": "calls a model function",
    "quantized": "in a Q/DQ pattern",
    "onnxruntime": "no {dtype} kernel in onnxruntime",
    "unknown type": "type not inferred",
    "float32 body": "inside a float32 body",
    "weightless": "weightless run between float32 nodes",
}
"""The no-change warning's words for the kinds of ``_island_reason`` (the text before its
colon); kinds not listed (the range flags: "activation range", ...) read as they are"""
_LISTED_OPS = 8


@dataclasses.dataclass(frozen=True)
class Float16Pass(DataAwarePass):
    """Convert a float32 model to float16 (or bfloat16), keeping float islands in float32.

    Rules:

    1. Every float32 tensor (weights, activations, If/Loop/Scan bodies) becomes ``dtype``
       except in *float islands*, nodes kept in float32. One Cast per value and type joins
       them, in the graph defining the value (a body reads an outer value already cast);
       Casts left as identities are removed.
    2. Weights (initializers, Constant and ConstantOfShape values) are stored in ``dtype``
       when a consumer runs in it (cast back up for island consumers). A weight that would
       not survive, |w| above the largest finite value or every nonzero |w| under the
       8-significant-bit limit (2^-17 for float16: a 1e-12 epsilon), is never clamped: it
       stays float32 and so do its consumers.
    3. A node is an island when (a) its op type is in ``block_ops``; (b) its name equals or
       fully matches an ``exclude`` regex; (c) its ONNX schema has no ``dtype`` for a float
       input or output, it has no schema, or an input type is unknown; (d) it calls a
       model-local function (functions are typed per call and have no statistics inside:
       they stay float32, logged); (e) it reads or writes a main-graph tensor whose
       calibrated max |x| exceeds ``max_fraction`` x the largest value (65504) or is nonzero
       under the limit of rule 2; (f) it reads or writes a weight rule 2 keeps; (g) it is in
       the body of an island If/Loop/Scan; (h) it is part of a quantized pattern: a
       QuantizeLinear, a DequantizeLinear of an activation, a node reading one or feeding a
       QuantizeLinear, and a DequantizeLinear (of a weight) read only by such nodes.
       onnxruntime fuses these into integer kernels; a Cast between would unfuse them (on
       PP-OCRv4 det after ``quant``: 343 Casts, 1.46x slower and a larger file); (i) it
       is in a *weightless run* (``fp16_islands``; off with ``weightless_runs=False``):
       nodes joined by float32 values that read under 1024 float32 weight elements and
       would be float32 on every side. Converting one only adds Casts; (j) onnxruntime's
       CPU provider cannot run it in float16 (``fp16_islands.onnxruntime_refuses``): a
       ScatterElements/ScatterND with a reduction (no kernel), or a Transpose that moves
       axis 0 to -2 or -1 into a MatMul (the session crashes where it is float16); (k) its
       output reaches a Log through linear ops (``log_cone``), unless ``log_inputs``: a
       quiet frame's power spectrum falls below float16's normal range, which the Log
       spreads out (onnx-asr's NeMo front end: relative error 0.023, 2e-4 with its STFT Conv
       float32).
    4. Inputs the schema fixes to float32 (Resize scales) stay float32, and so does Resize's
       roi (coordinates; see ``_KEPT_FLOAT_INPUTS``); ``Cast.to``,
       ``ConstantOfShape.value`` and the ``dtype`` of EyeLike/Random*/Bernoulli follow the
       node; outputs typed by other attributes (LayerNormalization Mean) stay float32.
    5. ``keep_io_types``: main-graph inputs and outputs stay float32 (Casts at the edges,
       names kept); else they become ``dtype`` unless rule 3 (e) flags them. Body inputs
       and outputs follow their If/Loop/Scan node.
    6. Value types are updated where a value carries one; the result must pass onnx's
       strict type inference if the input did, else ``ShrinkError``.
    7. With ``activations_only`` off (the default), on a model whose weight bytes are
       mostly 4/8/16-bit integers (quantized already), a conversion that would store under
       ``fp16_worth.MIN_HALVED_SHARE`` of them in ``dtype`` is not made (no change, with a warning):
       it only puts activations (T5's residual stream and RMSNorms) in ``dtype``, which
       saves no bytes and, on onnxruntime's CPU, no time, and cost an int8 T5 encoder
       cosine 0.93.

    Statistics: one "minmax" per float32 tensor of the main graph. onnxruntime's CPU
    provider has few float16 kernels and casts around the rest: there float16 saves bytes,
    not time. bfloat16 needs a GPU provider.
    """

    name: ClassVar[str] = "fp16"
    dtype: Literal["float16", "bfloat16"] = option(
        "float16", "target format", choices=("float16", "bfloat16")
    )
    keep_io_types: bool = option(True, "graph inputs and outputs stay float32 (Casts at edges)")
    block_ops: tuple[str, ...] = option(DEFAULT_BLOCK_OPS, "op types always kept in float32")
    exclude: tuple[str, ...] = option(
        (), "node names or full-match regexes kept in float32", patterns=True
    )
    max_fraction: float = option(
        0.5, "float32 where calibrated |x| > this x the format's max", minimum=1e-6, maximum=1.0
    )
    activations_only: bool = option(
        False,
        "convert even where almost no float32 weight would be stored in dtype (a model whose "
        "weights are int8 already): activations alone, for a GPU provider's float16 kernels",
    )
    log_inputs: bool = option(
        False,
        "also convert the nodes whose output reaches a Log through linear ops (a log-mel front "
        "end), kept float32 by default: quiet bins fall below float16's normal range",
    )
    weightless_runs: bool = option(
        True,
        "keep float32 the runs of nodes that hold under 1024 float32 weight elements and are "
        "float32 on every side (converted, they only add Casts)",
    )

    def __post_init__(self) -> None:
        check_options(self)

    def requests(self, model: ir.Model) -> list[StatRequest]:
        # Here, not in apply: requests see the model as the pipeline hands it over.
        warn_unmatched_exclusions(model, self.name, self.exclude)
        half_weights.lift(model)  # weights, not activations: apply puts back those left
        asked = [op for op in self.block_ops if op not in DEFAULT_BLOCK_OPS]
        warn_unmatched_op_types(model, f"{self.name}.block_ops", asked)
        dtypes = fp16_types.tensor_dtypes(model)
        values = [v for v in walk.graph_values(model.graph) if not v.is_initializer()]
        values = [v for v in values if (p := v.producer()) is None or p.op_type != "Constant"]
        return [StatRequest(v.name, "minmax") for v in values if v.name and dtypes.get(v) == FLOAT]

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        # A float16 weight behind a Cast to float32 is a float32 weight to convert: the
        # node then reads it as stored, with no Cast; one in a float island gets it back.
        with half_weights.lifted(model):
            error_before = large_tensors.load_error(model)
            modified = _Conversion(self, model).run(stats)
        error = large_tensors.load_error(model) if modified else None
        if error is not None and error_before is None:
            raise ShrinkError(f"fp16: the converted model fails type inference: {error}")
        return ir.passes.PassResult(model, modified)


@functools.cache
def _first_opset_taking(op_type: str, version: int, type_str: str) -> int | None:
    """The first opset after ``version`` whose ``op_type`` takes ``type_str``."""
    for newer in range(version + 1, onnx.defs.onnx_opset_version() + 1):
        schema = fp16_types.schema(op_type, "", newer)
        if schema is not None and schema.since_version == newer:
            allowed = {t for c in schema.type_constraints for t in c.allowed_type_strs}
            if type_str in allowed:
                return newer
    return None


class _Conversion:
    """The state of one conversion: original types, islands, new types and inserted Casts."""

    def __init__(self, pass_: Float16Pass, model: ir.Model) -> None:
        self.pass_ = pass_
        self.model = model
        self.fmt = FORMATS[pass_.dtype]
        self.target = self.fmt.dtype
        self.orig = fp16_types.tensor_dtypes(model)
        self.scopes = list(walk.scopes(model.graph))
        self.islands: dict[ir.Node, str] = {}
        self.signatures: dict[ir.Node, tuple[list[bool], list[bool]]] = {}
        self.flagged: dict[ir.Value, str] = {}
        self.new: dict[ir.Value, ir.DataType] = {}
        self.casts: dict[graph_edit.CastKey, ir.Value] = {}
        self.names = graph_edit.value_names(model.graph)
        # Rule 3 (k) walks from each node: only where there is a Log to reach.
        self.keeps_log_cone = not pass_.log_inputs and any(
            n.op_type == "Log" for g, _ in self.scopes for n in g
        )

    def run(self, stats: Statistics) -> bool:
        for function in self.model.functions.values():
            logger.info("fp16: function %s stays float32 (rule 3 d)", function.name)
        self._flag_values(stats)
        for graph, owner in self.scopes:
            for node in graph:
                if (reason := self._island_reason(node, owner)) is not None:
                    self.islands[node] = reason
                    logger.debug("fp16: %s (%s) stays float32: %s", node.name, node.op_type, reason)
        self._structural_islands()
        self._assign_types()
        if not self.pass_.activations_only and not fp16_worth.halves_weights(
            self.scopes, self.new, self.target, self.islands, self.pass_.dtype
        ):
            return False
        changed = self._convert()
        kinds = [reason.split(":")[0] for reason in self.islands.values()]
        logger.info(
            "fp16: %d Casts; float islands: %s", len(self.casts), dict(Counter(kinds)) or "none"
        )
        modified = bool(changed or self.casts)
        if not modified:  # "(no change)" in the summary said nothing of why (-v did)
            # Each node's reason is a debug line: a model's float islands can be thousands.
            dtype = self.pass_.dtype
            why = [_KIND_WORDS.get(kind, kind).format(dtype=dtype) for kind in kinds]
            ops = sorted({node.op_type for node in self.islands})
            listed = ", ".join(ops[:_LISTED_OPS]) + (", ..." if len(ops) > _LISTED_OPS else "")
            note = f"; op types kept: {listed}" if ops else ""
            warn_no_change(self.pass_.name, "node", why, each="-vv", note=note)
        self._warn_older_opset()
        return modified

    def _convert(self) -> list[ir.Value]:
        """Casts, weights, attributes and value types as assigned; the values retyped, none
        where every node stays float32: converting the graph's inputs and outputs alone
        (keep_io_types=false) would only add Casts, and an SVMClassifier-only model (opset
        ai.onnx.ml alone) got one it has no opset for, and the pass failed."""
        if all(node in self.islands for graph, _ in self.scopes for node in graph):
            return []
        self._rewire()
        self._convert_attributes_and_weights()
        changed = fp16_types.retype(self.new, self.orig)
        self._drop_identity_casts()
        return changed

    def _warn_older_opset(self) -> None:
        """Say where nodes kept float32 for their schema would take the type at a newer
        opset (bfloat16 came to most ops at 13: DTLN and NSNet2, at 11, changed nothing)."""
        version = walk.onnx_opset(self.model)
        kept = Counter(
            node.op_type
            for node, reason in self.islands.items()
            if reason.startswith("schema: ") and node.domain in ("", "ai.onnx")
        )
        needed = {
            op: first
            for op in kept
            if (first := _first_opset_taking(op, version, self.fmt.type_str)) is not None
        }
        if needed:
            first, last = min(needed.values()), max(needed.values())
            at = f"opset {last}" if first == last else f"opsets {first}-{last} ({last}: all)"
            logger.warning(
                "%s: %d nodes kept float32 have no %s at the model's opset %d but do at %s: "
                "convert the model first (onnx.version_converter) to convert them too",
                self.pass_.name,
                sum(kept[op] for op in needed),
                self.pass_.dtype,
                version,
                at,
            )

    def _flag(self, value: ir.Value, absmax: float, limit: float, kind: str) -> None:
        if absmax > limit:
            self.flagged[value] = f"{kind} range: '{value.name}' reaches |x|={absmax:.4g}"
        elif 0 < absmax < self.fmt.tiny:
            self.flagged[value] = f"{kind} underflow: '{value.name}' has max |x|={absmax:.3g}"

    def _flag_values(self, stats: Statistics) -> None:
        """Rule 3 (e) from the statistics of main-graph tensors, rule 2 from every weight."""
        limit = self.pass_.max_fraction * self.fmt.largest
        for value in walk.graph_values(self.model.graph):
            minmax = stats.minmax(value.name or "") if self.orig.get(value) == FLOAT else None
            if minmax is not None and minmax.elements and value.const_value is None:
                self._flag(value, max(-minmax.minimum, minmax.maximum), limit, "activation")
        for graph, _ in self.scopes:
            weights = [(v, v.const_value) for v in graph.initializers.values()]
            weights += [
                (n.outputs[0], t)
                for n in graph
                if (t := fp16_islands.constant_tensor(n)) is not None
            ]
            for value, tensor in weights:
                if tensor is not None and tensor.dtype == FLOAT:
                    array = np.abs(tensor.numpy())
                    absmax = float(np.max(array, initial=0.0, where=np.isfinite(array)))
                    self._flag(value, absmax, self.fmt.largest, "weight")

    def _island_reason(self, node: ir.Node, owner: ir.Node | None) -> str | None:
        if owner is not None and owner in self.islands:
            return f"float32 body: inside {owner.op_type} '{owner.name}'"
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if not any(self.orig.get(v) == FLOAT for v in values) and node.op_type not in (
            _TYPED_BY_ATTRIBUTE - {"Cast", "Constant"}
        ):
            return None  # no float32 in or out: its status changes nothing
        if node.name and any(pattern_names(p, node.name) for p in self.pass_.exclude):
            return "exclude: by name"
        if node.op_type in self.pass_.block_ops:
            return f"block_ops: {node.op_type}"
        if (node.domain, node.op_type, node.overload) in self.model.functions:
            return f"function: calls {node.op_type}"
        if fp16_islands.in_quantized_pattern(node):
            return f"quantized: {node.op_type} in a Q/DQ pattern"
        if (refused := fp16_islands.onnxruntime_refuses(node)) is not None:
            return f"onnxruntime: {refused}"
        if self.keeps_log_cone and log_cone.feeds_log(node):
            return "log: " + log_cone.reason(self.pass_.name, log_cone.FLOAT16_HARM, "converts")
        for value in values:
            if value in self.flagged:
                return self.flagged[value]
        if any(v is not None and v.name and v not in self.orig for v in values):
            return "unknown type: not a tensor, or not inferred"
        signature = self._signature(node)
        if isinstance(signature, str):
            return signature
        self.signatures[node] = signature
        return None

    def _structural_islands(self) -> None:
        """Rule 3 (h)'s weight dequantizers, then (i)'s weightless runs, once the other
        rules have chosen their islands (both follow from those)."""
        for graph, _ in self.scopes:
            for node in fp16_islands.weight_dequantizers_for(graph, self.islands):
                self.islands[node] = "quantized: a weight's DequantizeLinear for float32 nodes"
        if not self.pass_.weightless_runs:
            return
        io_converts = not self.pass_.keep_io_types
        for run in fp16_islands.weightless_runs(
            self.model.graph, self.islands, self.orig.get, io_converts
        ):
            for node in run:
                self.islands[node] = f"weightless: a run of {len(run)} between float32 nodes"

    def _signature(self, node: ir.Node) -> tuple[list[bool], list[bool]] | str:
        """Which inputs and outputs of ``node`` follow the conversion, or why none can.

        Parameters typed by a type variable follow (if it allows the target), fixed ones
        (``tensor(float)``) do not, nor do outputs typed by attributes rule 4 leaves alone.
        """
        domain = "" if node.domain == "ai.onnx" else node.domain
        schema = fp16_types.node_schema(self.model, node)
        if schema is None:
            return f"schema: none for {domain or 'ai.onnx'}::{node.op_type}"
        constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        bound = {p.type_str for p in schema.inputs}
        bound = None if node.op_type in _TYPED_BY_ATTRIBUTE else bound
        params = [(fp16_types.formal(schema.inputs, i), v, True) for i, v in enumerate(node.inputs)]
        params += [
            (fp16_types.formal(schema.outputs, i), v, False) for i, v in enumerate(node.outputs)
        ]
        converts: list[bool] = []
        kept = _KEPT_FLOAT_INPUTS.get(node.op_type, frozenset()) if not domain else frozenset()
        for position, (formal, value, is_input) in enumerate(params):
            follows = formal in constraints and (is_input or bound is None or formal in bound)
            follows = follows and position not in kept  # inputs come first in params
            converts.append(follows)
            if follows and value is not None and self.orig.get(value) == FLOAT:
                if self.fmt.type_str not in constraints[formal or ""]:
                    return f"schema: {node.op_type} has no {self.pass_.dtype} for {formal}"
        return converts[: len(node.inputs)], converts[len(node.inputs) :]

    def _required(self, node: ir.Node, index: int) -> ir.DataType | None:
        """The type ``node`` needs at input ``index`` (None: not a float32 input)."""
        value = node.inputs[index]
        if value is None or self.orig.get(value) != FLOAT:
            return None
        return self._output_type(node, index, side=0)

    def _output_type(self, node: ir.Node, index: int, side: int = 1) -> ir.DataType:
        converts = node not in self.islands and self.signatures[node][side][index]
        return self.target if converts else FLOAT

    def _io_type(self, value: ir.Value, owner: ir.Node | None) -> ir.DataType:
        if owner is None:
            keep = self.pass_.keep_io_types or value in self.flagged
            return FLOAT if keep else self.target
        return FLOAT if owner in self.islands else self.target

    def _weight_type(self, value: ir.Value, owner: ir.Node | None) -> ir.DataType:
        if value in self.flagged or value.producer() in self.islands:
            return FLOAT
        if value.is_graph_output():
            return self._io_type(value, owner)
        needed = any(self._required(u.node, u.idx) == self.target for u in value.uses())
        return self.target if needed else FLOAT

    def _assign_types(self) -> None:
        for graph, owner in self.scopes:
            weights = [v for v in graph.initializers.values() if not v.is_graph_input()]
            weights += [n.outputs[0] for n in graph if n.op_type == "Constant"]
            for node in graph:
                for index, value in enumerate(node.outputs):
                    if self.orig.get(value) == FLOAT and node.op_type != "Constant":
                        self.new[value] = self._output_type(node, index)
            for value in graph.inputs:
                if self.orig.get(value) == FLOAT:
                    self.new[value] = self._io_type(value, owner)
            for value in weights:
                if self.orig.get(value) == FLOAT:
                    self.new[value] = self._weight_type(value, owner)

    def _type(self, value: ir.Value) -> ir.DataType | None:
        return self.new.get(value, self.orig.get(value))

    def _rewire(self) -> None:
        for graph, owner in self.scopes:
            for node in list(graph):
                for index, value in enumerate(node.inputs):
                    needed = self._required(node, index)
                    if needed is not None and self._type(value) != needed:
                        node.replace_input_with(index, self._cast(value, needed, value.graph))
            converted: dict[ir.Value, ir.Value] = {}  # an output listed twice is cast once
            for index, value in enumerate(graph.outputs):
                if value in converted:
                    graph.outputs[index] = converted[value]
                    continue
                needed = self._io_type(value, owner)
                if self.orig.get(value) != FLOAT or self._type(value) == needed:
                    continue
                if owner is not None:
                    graph.outputs[index] = converted[value] = self._cast(value, needed, graph)
                    continue
                # Main graph: the Cast takes the output's name, so callers see no change.
                cast = self._cast(value, needed, value.graph)
                if cast.name != value.name and value.producer() is not None:
                    renamed = f"{value.name}_{self.pass_.dtype}"
                    name, value.name = value.name, graph_edit.fresh_name(renamed, self.names)
                    cast.name = name
                    cast.shape = value.shape.copy() if value.shape is not None else None
                graph.outputs[index] = converted[value] = cast

    def _cast(self, value: ir.Value, to: ir.DataType, graph: ir.Graph | None) -> ir.Value:
        """``value`` cast to ``to`` by one Cast node in ``graph`` (shared by every reader)."""
        assert graph is not None
        suffix = "fp32" if to == FLOAT else self.pass_.dtype
        out, made = graph_edit.shared_cast(value, to, graph, self.casts, self.names, suffix)
        if made:
            self.new[out] = to
        return out

    def _convert_attributes_and_weights(self) -> None:
        for graph, _ in self.scopes:
            for value in graph.initializers.values():
                if self.new.get(value) == self.target and value.const_value is not None:
                    value.const_value = fp16_types.converted(value.const_value, self.target)
            for node in graph:
                out = node.outputs[0] if node.outputs else None
                if out is not None and self.orig.get(out) == FLOAT != self.new.get(out):
                    fp16_types.retype_attributes(node, _FLOATS, self.target)

    def _drop_identity_casts(self) -> None:
        for graph, _ in self.scopes:
            for node in list(graph):
                source, out = node.inputs[0] if node.inputs else None, node.outputs[0]
                if node.op_type != "Cast" or source is None or out.is_graph_output():
                    continue
                if self._type(source) == node.attributes.get_int("to"):  # converted to a no-op
                    out.replace_all_uses_with(source)
                    graph.remove(node, safe=True)
