"""Constant weights of MatMul, Gemm and Gather: which ones a weight-quantizing pass can
rewrite, and the initializers it writes for them (shared by ``quant-dynamic`` and
``quant-weight``).

``match_linear`` reads ``Y = alpha * A @ op(W) + bias`` off a MatMul (with the bias ``Add``
that alone reads it) or a Gemm; ``gather_reason`` accepts a row lookup in a table;
``WeightContext`` holds one run of a pass: names in use, each weight quantized once, and the
float weights to drop once nothing reads them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import tied_weights, walk
from onnx_shrink.passes.quant import (
    clip_bounds,
    compact,
    quantized_already,
    table_readers,
    value_types,
    weight_warnings,
)

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"

Arrays = Mapping[str, "np.ndarray | ir.Tensor | None"]


def check_selection(op_types: tuple[str, ...], supported: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for an op type the pass cannot quantize (``exclude``'s patterns
    are checked with the other options: ``check_options``)."""
    unknown = sorted(set(op_types) - set(supported))
    if unknown:
        raise ValueError(f"op_types: {', '.join(unknown)} not one of {', '.join(supported)}")


_CONVERSION_LOGGERS = ("onnxscript.version_converter", "onnx_ir.passes.common.shape_inference")


def ensure_opset(model: ir.Model, target: int, purpose: str, pass_name: str) -> bool:
    """Convert a model older than opset ``target`` to it, in place; False when the converter
    cannot (the caller then does without ``purpose``, or refuses). Per-channel
    DequantizeLinear (``axis``) needs opset 13; 16-bit and blocked Q/DQ need 21."""
    version = walk.onnx_opset(model)
    if version >= target:
        return True
    try:
        from onnxscript.version_converter import ConvertVersionPass

        # Its own converter takes few opsets; for the others it warns, then converts with
        # onnx's C API as fallback=True asks. That is the conversion working, logged below.
        # The shape inference it runs after fails where the C API gave a float16 Clip float
        # bounds (mended below), with a traceback an attempt.
        quiet = [logging.getLogger(name) for name in _CONVERSION_LOGGERS]
        levels = [log.level for log in quiet]
        clips = clip_bounds.bound_types(model)
        try:
            for log in quiet:
                log.setLevel(logging.ERROR)
            with value_types.no_inferred_annotations(model):
                ConvertVersionPass(target_version=target, fallback=True)(model)
        finally:
            for log, level in zip(quiet, levels, strict=True):
                log.setLevel(level)
        clip_bounds.retype(model, clips)
    except Exception as e:  # noqa: BLE001 - any converter failure means: without ``purpose``
        logger.warning(
            "%s: cannot convert opset %d to %d (%s); no %s", pass_name, version, target, e, purpose
        )
        return False
    logger.info(
        "%s: converted the model from opset %d to %d for %s", pass_name, version, target, purpose
    )
    return True


def derived_name(node: ir.Node, suffix: str) -> str | None:
    """``<node name>_<suffix>`` for a node that replaces ``node``; None when it is unnamed."""
    return f"{node.name}_{suffix}" if node.name else None


def trimmed(*inputs: ir.Value | None) -> list[ir.Value | None]:
    """Node inputs without trailing omitted optional ones."""
    values = list(inputs)
    while values and values[-1] is None:
        values.pop()
    return values


@dataclasses.dataclass
class WeightContext:
    """One run of a weight-quantizing pass: names in use, quantized weights, skip logging."""

    model: ir.Model
    pass_name: str
    exclude: tuple[re.Pattern[str], ...]
    min_elements: int
    names: compact.Names
    quantized: dict[tuple[int, Hashable], tuple[ir.Value | None, ...]]
    sources: list[ir.Value]
    skipped: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    """each node skipped, with its first reason: a node a pass looks at twice (GPTQ's Gram
    requests, then the quantization) counts once in the warnings"""
    orphans: set[ir.Value] = dataclasses.field(default_factory=set)
    """constants replaced nodes read besides their weight (a Gemm's C): dropped with the
    weights where nothing reads them any more"""
    zeros: dict[tuple[int, str, tuple[int, ...]], ir.Value] = dataclasses.field(
        default_factory=dict
    )
    """zero points written once per graph, type and shape (``zero_point``)"""

    quiet: bool = False
    """a look ahead (which weights will be quantized, which inputs to measure), not the
    quantization: it logs no skipped node, the quantization will"""

    @classmethod
    def of(
        cls,
        model: ir.Model,
        pass_name: str,
        exclude: tuple[str, ...],
        min_elements: int,
        *,
        quiet: bool = False,
    ) -> WeightContext:
        patterns = tuple(re.compile(p) for p in exclude)
        names = compact.Names(model.graph)
        return cls(model, pass_name, patterns, min_elements, names, {}, [], quiet=quiet)

    @property
    def opset(self) -> int:
        return walk.onnx_opset(self.model)

    def candidates(self, op_types: tuple[str, ...]) -> list[ir.Node]:
        """Nodes of ``op_types`` in the main graph and its subgraphs, less excluded ones."""
        for function in self.model.functions.values():
            if any(n.op_type in op_types for n in ir.traversal.RecursiveGraphIterator(function)):
                name = f"{function.domain}::{function.name}"
                logger.debug("%s: skipping function %s: no initializers", self.pass_name, name)
        nodes = []
        for node in table_readers.weight_nodes(self.model, op_types):
            if any(p.fullmatch(node.name or "") for p in self.exclude):
                self.skip(node, "excluded")
            else:
                nodes.append(node)
        return nodes

    def skip(self, node: ir.Node, reason: str) -> bool:
        if node not in self.skipped and not self.quiet:
            logger.debug(
                "%s: skipping %s (%s): %s", self.pass_name, node.name, node.op_type, reason
            )
            self.skipped[node] = reason
        return False

    def warn_nothing_quantized(self, op_types: Sequence[str]) -> None:
        """Say why the pass quantized nothing (``weight_warnings.nothing_quantized``)."""
        weight_warnings.nothing_quantized(self.model, self.pass_name, self.skipped, op_types)

    def weight_reason(
        self, value: ir.Value | None, *, rank: int = 2, min_elements: int | None = None
    ) -> str | None:
        """Why ``value`` is not a quantizable weight (a float32 constant initializer of
        ``rank``, with at least ``min_elements``, by default the pass's), or None."""
        if value is None or not value.is_initializer() or value.const_value is None:
            name = value.name if value else None
            if quantized_already.integer_weight(value):  # fold would not make it float
                return f"weight {name!r} is quantized already (integer codes dequantized)"
            if value is not None and _computed_from_constants(value):
                return f"weight {name!r} is computed from constants: run fold first"
            if value is not None and value.is_graph_input():
                return f"weight {name!r} is a graph input, not a constant"
            return f"weight {name!r} is not an initializer"
        if value.is_graph_input():
            return f"weight {value.name!r} is a graph input, so callers may override it"
        tensor = value.const_value
        if tensor.dtype != ir.DataType.FLOAT:
            return f"weight {value.name!r} is {tensor.dtype.name}, not FLOAT"
        if len(tensor.shape) != rank:
            return f"weight {value.name!r} has rank {len(tensor.shape)}, not {rank}"
        least = self.min_elements if min_elements is None else min_elements
        if tensor.size < least:
            return f"weight {value.name!r} has {tensor.size} < {least} elements"
        return None

    def weights(
        self, value: ir.Value, key: Hashable, quantize: Callable[[np.ndarray], Arrays]
    ) -> tuple[ir.Value | None, ...]:
        """Initializers of ``quantize(W)`` (None stays None), made once per weight and key.

        They are registered in the graph that holds ``W``, so subgraphs keep reading them
        from the same scope as the float weight.
        """
        cache_key = (id(value), key)
        if cache_key not in self.quantized:
            assert value.const_value is not None and value.graph is not None
            arrays = quantize(value.const_value.numpy())
            self.quantized[cache_key] = tuple(
                None if a is None else self._initializer(value.graph, f"{value.name}_{k}", a)
                for k, a in arrays.items()
            )
            self.sources.append(value)
        return self.quantized[cache_key]

    def constant(
        self, node: ir.Node, suffix: str, value: ir.Value | np.ndarray | None
    ) -> ir.Value | None:
        """``value`` itself, or a new initializer of ``node``'s graph holding an array."""
        if value is None or isinstance(value, ir.Value):
            return value
        assert isinstance(node.graph, ir.Graph)
        return self._initializer(node.graph, f"{node.name or node.op_type}_{suffix}", value)

    def zero_point(self, graph: ir.Graph, dtype: type, shape: tuple[int, ...]) -> ir.Value:
        """An initializer of zeros in ``graph``, one per type and shape however many nodes
        read it (an op that takes zero points even for symmetric weights: the LSTM's)."""
        key = (id(graph), np.dtype(dtype).name, shape)
        if key not in self.zeros:
            self.zeros[key] = self._initializer(graph, "zero_point", np.zeros(shape, dtype))
        return self.zeros[key]

    def read_dequantized(self, node: ir.Node, dequantize: ir.Node) -> None:
        """``node`` reads its weight (input 1) from ``dequantize``, put in the graph of the
        codes it reads (their first input): where ``node`` is in a body that reads them from
        outside, before the node holding that body. onnxruntime (1.32) refused a chars2vec
        LSTM whose Loop body held the DequantizeLinear ("Missing required weight"); outside,
        it runs once a run. Its output is named: bodies name their values apart."""
        codes = dequantize.inputs[0]
        assert codes is not None
        dequantize.outputs[0].name = self.names.fresh(f"{codes.name}_dequantized")
        walk.insert_before_holder(codes.graph, node, dequantize)
        node.replace_input_with(1, dequantize.outputs[0])

    def _initializer(self, graph: ir.Graph, base: str, array: np.ndarray | ir.Tensor) -> ir.Value:
        name = self.names.fresh(base)
        tensor = array if isinstance(array, ir.Tensor) else ir.Tensor(array)
        tensor.name = name
        value = ir.Value(
            name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype)
        )
        graph.register_initializer(value)
        return value

    def replace(self, old_nodes: list[ir.Node], new_nodes: list[ir.Node]) -> None:
        """Put ``new_nodes`` where ``old_nodes`` were, importing their domains; the last node
        of each list has the same outputs (an LSTM's three, a MatMul's one)."""
        graph, last = old_nodes[0].graph, old_nodes[-1]
        assert graph is not None
        old, new = list(last.outputs), list(new_nodes[-1].outputs)
        assert len(old) == len(new), (last.op_type, new_nodes[-1].op_type)
        self.orphans.update(
            v for n in old_nodes for v in n.inputs if v is not None and v.is_initializer()
        )
        ir.convenience.replace_nodes_and_values(graph, last, old_nodes, new_nodes, old, new)
        # A domain is imported where a node of it is written: GRU and RNN stay standard ops,
        # and a model with only those quantized imported com.microsoft unused.
        for node in new_nodes:
            if node.domain not in ("", "ai.onnx"):
                self.model.opset_imports.setdefault(node.domain, 1)

    def drop_dead_weights(self) -> None:
        """Remove float weights, and the other constants replaced nodes read (a Gemm's C, now
        a scaled copy), that no node or graph output reads any more; warn about weights still
        read (a weight tied to a node left float is then stored twice: float and not). A
        transposed copy left float beside its float source is a Transpose again
        (``tied_weights.restore``)."""
        tied_weights.restore(self.model)
        for value in self.orphans - set(self.sources):
            _drop_if_unread(value)
        kept = []
        for value in dict.fromkeys(self.sources):  # once each, however many layouts it got
            if not _drop_if_unread(value) and value.const_value is not None:
                kept.append(value)
        if kept:
            uses = [use.node for value in kept for use in value.uses()]
            readers = sorted({node.op_type for node in uses})
            # A reader of constants only (a Transpose of the weight) is what fold computes.
            foldable = any(
                all(v is None or v.const_value is not None for v in n.inputs) for n in uses
            )
            names = ", ".join(str(value.name) for value in kept[:5])
            logger.warning(
                "%s: %d quantized weight(s) are also read as float (by %s), so the model keeps "
                "both copies (%d float bytes): %s%s%s",
                self.pass_name,
                len(kept),
                ", ".join(readers) or "graph outputs",
                sum(value.const_value.nbytes for value in kept),
                names,
                ", ..." if len(kept) > 5 else "",
                "; those readers compute on constants only: run fold before this pass"
                if foldable
                else "",
            )


@dataclasses.dataclass(frozen=True)
class LinearMatch:
    """``Y = alpha * A @ op(W) + bias``, where ``op`` transposes if ``transposed``."""

    activation: ir.Value
    weight: ir.Value
    transposed: bool
    alpha: float
    bias: ir.Value | np.ndarray | None
    replaced: list[ir.Node]

    def prepare(self, w: np.ndarray) -> np.ndarray:
        """``alpha * op(W)`` as [K, N]: alpha * A @ B == A @ (alpha * B)."""
        w = w.T if self.transposed else w
        return w * np.float32(self.alpha) if self.alpha != 1.0 else w


def _computed_from_constants(value: ir.Value, limit: int = 64) -> bool:
    """``value`` is computed from constants only (initializers and Constant nodes, no graph
    input), within ``limit`` producers: what fold computes (Silero VAD's LSTM weights are a
    Slice, Concat and Unsqueeze of its initializers)."""
    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        if current.const_value is not None or current in seen:
            continue
        producer = current.producer()
        if producer is None or len(seen) >= limit:
            return False  # a graph input, or more than fold's reason is worth
        seen.add(current)
        pending.extend(v for v in producer.inputs if v is not None)
    return True


def _drop_if_unread(value: ir.Value) -> bool:
    """Remove initializer ``value`` where no node, graph output or caller (a graph input:
    a default it may feed) reads it; whether it went. Quantized weights are never graph
    inputs (``placement.overridable_constants`` keeps those nodes float)."""
    if value.uses() or value.is_graph_output() or value.is_graph_input() or value.graph is None:
        return False
    assert value.name is not None
    del value.graph.initializers[value.name]
    return True


def match_linear(context: WeightContext, node: ir.Node) -> LinearMatch | str:
    """Match a MatMul (and its bias Add) or a Gemm on a constant weight; else a reason."""
    activation, weight = node.inputs[0], node.inputs[1]
    reason = context.weight_reason(weight)
    if reason is not None or activation is None or weight is None:
        return reason or "missing input"
    if activation.shape is not None and len(activation.shape) < 2:
        return "1-D activation"
    assert weight.const_value is not None
    k, n = weight.const_value.shape
    if node.op_type == "MatMul":
        add, bias = bias_add(node, n)
        replaced = [node] if add is None else [node, add]
        return LinearMatch(activation, weight, False, 1.0, bias, replaced)
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "transA=1"
    transposed = bool(attrs.get_int("transB", 0))
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    n = k if transposed else n
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return LinearMatch(activation, weight, transposed, alpha, None, [node])
    if c.const_value is None or c.is_graph_input():
        return "C is not a constant"
    c_array = c.const_value.numpy().astype(np.float32)
    if c_array.ndim == 2 and c_array.shape[0] != 1:
        return f"C of shape {c_array.shape} varies along rows, it is no bias"
    if beta == 1.0 and c_array.shape == (n,):
        return LinearMatch(activation, weight, transposed, alpha, c, [node])
    # C broadcasts over rows: shape (), (1,), (N,), (1, 1) or (1, N).
    bias = np.broadcast_to(c_array.reshape(c_array.shape[-1:]), (n,)) * np.float32(beta)
    return LinearMatch(activation, weight, transposed, alpha, np.ascontiguousarray(bias), [node])


def bias_add(node: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The ``Add`` that alone reads a MatMul's output with a constant float32 [N], if any."""
    output = node.outputs[0]
    uses = output.uses()
    if output.is_graph_output() or len(uses) != 1:
        return None, None
    add, index = uses[0]
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None, None
    bias = add.inputs[1 - index]
    if (
        add.domain not in ("", "ai.onnx")
        or add.graph is not node.graph
        or bias is None
        or bias.is_graph_input()
        or not bias.is_initializer()
        or bias.const_value is None
        or bias.const_value.dtype != ir.DataType.FLOAT
        or tuple(bias.const_value.shape) != (n,)
    ):
        return None, None
    return add, bias


def gather_reason(context: WeightContext, node: ir.Node) -> str | None:
    """Why a Gather is not a row lookup in a quantizable table, or None."""
    reason = context.weight_reason(node.inputs[0])
    if reason is not None:
        return reason
    axis = node.attributes.get_int("axis", 0)
    return None if axis in (0, -2) else f"gathers along axis {axis}, not rows"
