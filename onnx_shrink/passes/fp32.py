"""Widening: a model that computes in float16/bfloat16 made to compute in float32.

The quantization passes quantize float32 computation: a model exported in half precision
(for a GPU) is left as it is by them. ``fp32`` first, then ``quant``, gives such a model
int8 kernels on the CPU. onnxruntime's quantizers have no such step, and on float16 models
write files that fail to load or to run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import ClassVar

import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, walk
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.compiler.options import check_options, option, warn_no_change
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes import fp16_types
from onnx_shrink.passes.quant.value_types import HALF_TYPES

logger = logging.getLogger(__name__)

FLOAT = ir.DataType.FLOAT
_FLOAT_TYPE_STR = "tensor(float)"
_ANY_FLOAT = frozenset({FLOAT, *HALF_TYPES})


@dataclasses.dataclass(frozen=True)
class Float32Pass(ir.passes.InPlacePass):
    """Compute in float32 what a model computes in float16 or bfloat16.

    Rules:

    1. Every float16/bfloat16 tensor of the main graph and of If/Loop/Scan bodies becomes
       float32: activations, weights (initializers, Constant and ConstantOfShape values,
       exactly: every half value is a float32 value), body inputs and outputs. ``Cast`` to a
       half type casts to float32, and the ``dtype`` of EyeLike/Random*/Bernoulli follows.
       Casts left as identities are removed.
    2. A weight stored in half precision whose every reader is a Cast to float32 stays as
       stored: the model computes with it in float32 already (storage, not computation).
    3. A node stays in half precision, with a Cast on each half input and output it has, when
       its ONNX schema has no float32 for one of its half parameters, it has no schema (a
       contrib op), or it calls a model-local function (typed per call); so does every node
       in the body of such a node.
    4. ``keep_io_types``: main-graph inputs and outputs keep their half type (a Cast after
       each input; a Cast before each output, which takes the output's name). Off, they
       become float32.
    5. Value types are updated where a value carries one; the result must pass onnx's type
       inference if the input did, else ``ShrinkError``.

    The result computes what the model computed, without the half precision's rounding in
    between: it is no farther from a float32 original than the half model was. Its half
    weights take twice the bytes; quantizing them next (``fp32,quant``) stores them in half of
    their half-precision bytes.
    """

    name: ClassVar[str] = "fp32"
    widens: ClassVar[bool] = True  # its result is larger by design: no "grew" warning
    keep_io_types: bool = option(
        True, "graph inputs and outputs keep their float16/bfloat16 type (Casts at the edges)"
    )

    def __post_init__(self) -> None:
        check_options(self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        error_before = large_tensors.load_error(model)
        modified = _Widening(model, self.keep_io_types).run()
        error = large_tensors.load_error(model) if modified else None
        if error is not None and error_before is None:
            raise ShrinkError(f"fp32: the widened model fails type inference: {error}")
        return ir.passes.PassResult(model, modified)


class _Widening:
    """The state of one widening: original types, the nodes kept half, new types, Casts."""

    def __init__(self, model: ir.Model, keep_io_types: bool) -> None:
        self.model = model
        self.keep_io_types = keep_io_types
        self.guessed, self.orig = _guess_contrib_outputs(model)
        self.scopes = list(walk.scopes(model.graph))
        self.kept: dict[ir.Node, str] = {}
        self.new: dict[ir.Value, ir.DataType] = {}
        self.casts: dict[graph_edit.CastKey, ir.Value] = {}
        self.names = graph_edit.value_names(model.graph)

    def run(self) -> bool:
        unknown = self._untyped_contrib_values()
        if unknown:
            for value in self.guessed:
                value.type = None
            logger.warning(
                "fp32: no node changed: the types around %s are not known (onnx cannot "
                "infer the outputs of ops outside its schemas; declare them in value_info)",
                ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else ""),
            )
            return False
        for graph, owner in self.scopes:
            for node in graph:
                if (reason := self._kept_reason(node, owner)) is not None:
                    self.kept[node] = reason
                    logger.debug("fp32: %s (%s) stays half: %s", node.name, node.op_type, reason)
        self._assign_types()
        self._rewire()
        self._convert_weights_and_attributes()
        changed = fp16_types.retype(self.new, self.orig)
        self._drop_identity_casts()
        modified = bool(changed or self.casts)
        kinds = [reason.split(":")[0] for reason in self.kept.values()]
        if modified:
            logger.info(
                "fp32: %d values widened, %d Casts; kept half: %s",
                len(changed),
                len(self.casts),
                dict(Counter(kinds)) or "none",
            )
        else:
            warn_no_change("fp32", "node", kinds, each="-vv", none="no float16/bfloat16 tensor")
        return modified

    def _untyped_contrib_values(self) -> list[str]:
        """Values read or made by a node without a schema whose element type is unknown: the
        pass could not tell whether they are half, nor Cast them right."""
        names = []
        for graph, _ in self.scopes:
            for node in graph:
                if fp16_types.node_schema(self.model, node) is not None:
                    continue
                values = [v for v in (*node.inputs, *node.outputs) if v is not None]
                names += [f"'{v.name}' ({node.op_type})" for v in values if v not in self.orig]
        return names

    def _io_kept(self, owner: ir.Node | None) -> bool:
        """Whether the inputs and outputs of the graph ``owner`` owns keep their half type:
        the main graph's with ``keep_io_types`` (rule 4), a kept node's body's (rule 3)."""
        return owner is None and self.keep_io_types or owner in self.kept

    def _half(self, value: ir.Value | None) -> bool:
        return value is not None and self.orig.get(value) in HALF_TYPES

    def _kept_reason(self, node: ir.Node, owner: ir.Node | None) -> str | None:
        """Why ``node`` stays in half precision (rule 3), or None."""
        if owner is not None and owner in self.kept:
            return f"body: inside {owner.op_type} '{owner.name}'"
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if not any(self._half(v) for v in values):
            return None  # nothing half in or out: nothing to widen
        if (node.domain, node.op_type, node.overload) in self.model.functions:
            return f"function: calls {node.op_type}"
        schema = fp16_types.node_schema(self.model, node)
        if schema is None:
            return f"schema: none for {node.domain or 'ai.onnx'}::{node.op_type}"
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        params = [(schema.inputs, i, v) for i, v in enumerate(node.inputs)]
        params += [(schema.outputs, i, v) for i, v in enumerate(node.outputs)]
        for formals, index, value in params:
            formal = fp16_types.formal(formals, index)
            if self._half(value) and _FLOAT_TYPE_STR not in allowed.get(formal or "", ()):
                return f"schema: {node.op_type} has no float32 for {formal}"
        return None

    def _storage_only(self, value: ir.Value) -> bool:
        """Rule 2: a half weight read by Casts to float32 alone."""
        uses = list(value.uses())
        return bool(uses) and all(
            u.node.op_type == "Cast" and u.node.attributes.get_int("to") == FLOAT for u in uses
        )

    def _assign_types(self) -> None:
        """Rule 1's new type of each half value (float32 unless rules 2-4 keep it)."""
        for graph, owner in self.scopes:
            for value in graph.inputs:
                if self._half(value) and not self._io_kept(owner):
                    self.new[value] = FLOAT
            for value in graph.initializers.values():
                if self._half(value) and not value.is_graph_input():
                    if not self._storage_only(value) and self._read_widened(value):
                        self.new[value] = FLOAT
            for node in graph:
                if node in self.kept:
                    continue
                for value in node.outputs:
                    if self._half(value) and not (
                        node.op_type == "Constant" and self._storage_only(value)
                    ):
                        self.new[value] = FLOAT

    def _read_widened(self, value: ir.Value) -> bool:
        # An output that keeps its type (rule 4) stays as stored, its readers cast it up:
        # cast back for the output, it would lose its name (an initializer has no producer).
        if value.is_graph_output():
            return not self.keep_io_types
        return any(u.node not in self.kept for u in value.uses())

    def _type(self, value: ir.Value) -> ir.DataType | None:
        return self.new.get(value, self.orig.get(value))

    def _needed(self, node: ir.Node, value: ir.Value) -> ir.DataType | None:
        """The type ``node`` reads ``value`` in: its original half type where the node stays
        half, float32 where a widened node reads a half value (None: not a half value)."""
        if not self._half(value):
            return None
        if node in self.kept:
            return self.orig[value]
        if node.op_type == "Cast":
            return None  # reads any type; a storage-only weight's Cast keeps reading it (rule 2)
        return FLOAT

    def _rewire(self) -> None:
        for graph, owner in self.scopes:
            for node in list(graph):
                for index, value in enumerate(node.inputs):
                    needed = self._needed(node, value) if value is not None else None
                    if needed is not None and self._type(value) != needed:
                        node.replace_input_with(index, self._cast(value, needed, value.graph))
            for index, value in enumerate(graph.outputs):
                if not self._half(value):
                    continue
                needed = self.orig[value] if self._io_kept(owner) else FLOAT
                if self._type(value) != needed:
                    graph.outputs[index] = self._cast_output(value, needed, graph, owner)

    def _cast_output(
        self, value: ir.Value, to: ir.DataType, graph: ir.Graph, owner: ir.Node | None
    ) -> ir.Value:
        """``value`` cast to ``to`` for a graph output: in the main graph the Cast takes the
        output's name, so callers see no change."""
        where = value.graph if value.graph is not None else graph
        cast = self._cast(value, to, where)
        # Renamed once: a second slot of the output finds the Cast an output already. Made
        # earlier for a half reader (a kept contrib op), it is renamed all the same.
        if not cast.is_graph_output() and owner is None and value.producer() is not None:
            name, value.name = value.name, graph_edit.fresh_name(f"{value.name}_fp32", self.names)
            cast.name = name  # its shape is the value's (keep_shape)
        return cast

    def _cast(self, value: ir.Value, to: ir.DataType, graph: ir.Graph | None) -> ir.Value:
        """``value`` cast to ``to`` by one Cast node in ``graph`` (shared by every reader)."""
        assert graph is not None
        suffix = "fp32" if to == FLOAT else to.name.lower()
        out, made = graph_edit.shared_cast(
            value, to, graph, self.casts, self.names, suffix, keep_shape=True
        )
        if made:
            self.new[out] = to
        return out

    def _convert_weights_and_attributes(self) -> None:
        for graph, _ in self.scopes:
            for value in graph.initializers.values():
                if self.new.get(value) == FLOAT and value.const_value is not None:
                    value.const_value = fp16_types.converted(value.const_value, FLOAT)
            for node in graph:
                out = node.outputs[0] if node.outputs else None
                # retype_attributes changes only ops typed by an attribute (Cast, Constant...)
                if out is not None and self._half(out) and self.new.get(out) == FLOAT:
                    fp16_types.retype_attributes(node, HALF_TYPES, FLOAT)

    def _drop_identity_casts(self) -> None:
        """Remove the Casts widening made no-ops. One that makes a graph output goes where
        its source can take the output's name: a value its graph's node makes, not itself
        an input or an output (an output of ``Cast(y)`` and ``y`` itself stay apart)."""
        for graph, _ in self.scopes:
            for node in list(graph):
                source, out = node.inputs[0] if node.inputs else None, node.outputs[0]
                if node.op_type != "Cast" or source is None:
                    continue
                if self._type(source) != node.attributes.get_int("to"):
                    continue
                if not out.is_graph_output():
                    out.replace_all_uses_with(source)
                    graph.remove(node, safe=True)
                elif _renamable(source, graph) and list(graph.outputs).count(out) == 1:
                    name, shape = out.name, out.shape
                    out.replace_all_uses_with(source, replace_graph_outputs=True)
                    graph.remove(node, safe=True)
                    source.name = name
                    source.type = out.type  # an output carries its type
                    if source.shape is None and shape is not None:
                        source.shape = shape.copy()


_GUESS_ROUNDS = 64


def _guess_contrib_outputs(
    model: ir.Model,
) -> tuple[list[ir.Value], dict[ir.Value, ir.DataType]]:
    """Give the untyped outputs of nodes without a schema (onnxruntime's contrib ops) the
    type of their float inputs, where those are all of one half type, in place; returns the
    values typed and every tensor's type after (``fp16_types.tensor_dtypes``, whose last
    round serves as the pass's: one inference where no node lacks a schema). onnx's inference
    stops at such a node, and nothing after it has a type: widened without the Cast it needs,
    a reader of a float16 output failed to load (onnxruntime's float contrib ops compute and
    return their inputs' type). A node whose
    inputs are typed only once an earlier guess lets inference go on waits for the next
    round."""
    guessed: list[ir.Value] = []
    for _ in range(_GUESS_ROUNDS):
        dtypes = fp16_types.tensor_dtypes(model)
        added = False
        for node in walk.all_nodes(model):
            if fp16_types.node_schema(model, node) is not None:
                continue
            typed = (dtypes.get(v) for v in node.inputs if v is not None)
            floats = {dtype for dtype in typed if dtype in _ANY_FLOAT}
            if len(floats) != 1 or not floats <= HALF_TYPES:
                continue
            (half,) = floats
            for out in node.outputs:
                if out.type is None and out not in dtypes:
                    out.type = ir.TensorType(half)
                    guessed.append(out)
                    added = True
        if not added:
            return guessed, dtypes
    return guessed, fp16_types.tensor_dtypes(model)


def _renamable(value: ir.Value, graph: ir.Graph) -> bool:
    producer = value.producer()
    return (
        producer is not None
        and producer.graph is graph
        and not value.is_graph_output()
        and not value.is_graph_input()
    )
