"""Dynamic quantization: int8 MatMul/Gemm/Gather weights, activations quantized at run time.

Weights are quantized symmetrically, per output column ``n`` (or per tensor):
``s[n] = max_k |W[k, n]| / 127``, ``Wq = round(W / s)`` in [-127, 127], ``W ~ Wq * s``.
At run time onnxruntime quantizes the activation to uint8 (``DynamicQuantizeLinear``: range of
the whole tensor, widened to contain 0), multiplies in integers and rescales:
``Y = ((Aq - za) @ Wq) * (sa * s) + bias``.

The weight-matching helpers at the end (``WeightContext``, ``match_linear``, ``gather_reason``)
are shared with ``weight_only``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Hashable, Mapping
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.options import check_options, option
from onnx_shrink.passes.quant import compact
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, quantize_weight

logger = logging.getLogger(__name__)

SUPPORTED_OPS = ("MatMul", "Gemm", "Gather")
MS_DOMAIN = "com.microsoft"
INT8 = QUANT_TYPES["s8"]


@dataclasses.dataclass(frozen=True)
class QuantDynamicPass(ir.passes.InPlacePass):
    """Quantize constant MatMul/Gemm/Gather weights to int8 for dynamic (run-time) quantization.

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
    5. Skipped, with a debug log: nodes matched by ``exclude``, weights that are not float32
       initializers (or are graph inputs, so callers may override them), weights under
       ``min_weight_elements``. Model-local functions hold no initializers: skipped, logged.
    6. A weight shared by several rewritten nodes is quantized once; the float initializer
       stays as long as any other node (or a graph output) still reads it.
    7. If/Loop/Scan bodies are rewritten like the main graph; quantized initializers go to the
       graph that held the float weight, so outer-scope weights stay outer-scope.
    8. With ``narrow_storage``, per-channel scales are rounded up to float16 values before the
       weights are quantized, and every graph's constants are stored in the narrowest type
       that holds them exactly (``compact.store_narrow``).
    """

    name: ClassVar[str] = "quant-dynamic"

    op_types: tuple[str, ...] = option(
        SUPPORTED_OPS, f"op types to quantize, of {', '.join(SUPPORTED_OPS)}"
    )
    exclude: tuple[str, ...] = option(
        (), "node names or regular expressions (full match) to leave in float"
    )
    per_channel: bool = option(True, "one scale per output column (MatMul/Gemm) or embedding dim")
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

    def __post_init__(self) -> None:
        check_options(self)
        check_selection(self.op_types, SUPPORTED_OPS, self.exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        context = WeightContext.of(model, self.name, self.exclude, self.min_weight_elements)
        count = 0
        for node in context.candidates(self.op_types):
            if self.graphs == "subgraphs" and node.graph is model.graph:
                continue
            if node.op_type == "Gather":
                count += self._try_quantize_gather(context, node)
            else:
                count += self._try_quantize_linear(context, node)
        if count and self.fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        context.drop_dead_weights()
        if count and self.narrow_storage:
            compact.store_narrow(model)
        logger.info("%s: quantized %d nodes", self.name, count)
        return ir.passes.PassResult(model, count > 0)

    def _try_quantize_linear(self, context: WeightContext, node: ir.Node) -> bool:
        if not self.fused and context.opset < 11:
            return context.skip(node, f"fused=False needs opset >= 11, not {context.opset}")
        match = match_linear(context, node)
        if isinstance(match, str):
            return context.skip(node, match)
        key = ("int8", match.transposed, match.alpha, self.per_channel)
        codes, scale = context.weights(match.weight, key, lambda w: self._quantize(match, w))
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

    def _quantize(self, match: LinearMatch, w: np.ndarray) -> dict[str, np.ndarray]:
        """int8 codes [K, N] and scales ([N], or one per tensor) of ``alpha * op(W)``."""
        axis = 1 if self.per_channel else None
        q = quantize_weight(match.prepare(w), INT8, axis=axis, scale_rounding=self._rounding(axis))
        return {"int8": q.values, "scale": q.scale}

    def _rounding(self, axis: int | None) -> Callable[[np.ndarray], np.ndarray] | None:
        """Per-channel scales become float16 values with ``narrow_storage`` (then stored so)."""
        return compact.float16_scale if self.narrow_storage and axis is not None else None

    def _try_quantize_gather(self, context: WeightContext, node: ir.Node) -> bool:
        reason = gather_reason(context, node)
        if reason is not None:
            return context.skip(node, reason)
        if context.opset < 10:
            return context.skip(node, f"DequantizeLinear needs opset >= 10, not {context.opset}")
        # Per-axis DequantizeLinear (and a negative axis) exists from opset 13 on.
        per_channel = self.per_channel and context.opset >= 13
        axis = -1 if per_channel else None

        def quantize(w: np.ndarray) -> dict[str, np.ndarray]:
            q = quantize_weight(w, INT8, axis=axis, scale_rounding=self._rounding(axis))
            return {"int8": q.values, "scale": q.scale}

        data = node.inputs[0]
        assert data is not None
        codes, scale = context.weights(data, ("int8-rows", per_channel), quantize)
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


# ---- weight matching, shared with weight_only -------------------------------------------------

Arrays = Mapping[str, "np.ndarray | ir.Tensor | None"]


def check_selection(
    op_types: tuple[str, ...], supported: tuple[str, ...], exclude: tuple[str, ...]
) -> None:
    """Raise ``ValueError`` for an op type the pass cannot quantize or a bad ``exclude`` regex."""
    unknown = sorted(set(op_types) - set(supported))
    if unknown:
        raise ValueError(f"op_types: {', '.join(unknown)} not one of {', '.join(supported)}")
    for pattern in exclude:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"exclude: {pattern!r} is not a regular expression ({e})") from e


def derived_name(node: ir.Node, suffix: str) -> str | None:
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
    taken: set[str | None]
    quantized: dict[tuple[int, Hashable], tuple[ir.Value | None, ...]]
    sources: list[ir.Value]

    @classmethod
    def of(
        cls, model: ir.Model, pass_name: str, exclude: tuple[str, ...], min_elements: int
    ) -> WeightContext:
        taken: set[str | None] = set()
        for graph in model.graphs():
            taken.update(v.name for v in (*graph.inputs, *graph.initializers.values()))
            taken.update(v.name for node in graph for v in node.outputs)
        patterns = tuple(re.compile(p) for p in exclude)
        return cls(model, pass_name, patterns, min_elements, taken, {}, [])

    @property
    def opset(self) -> int:
        imports = self.model.opset_imports
        return imports.get("", imports.get("ai.onnx", 1))

    def candidates(self, op_types: tuple[str, ...]) -> list[ir.Node]:
        """Nodes of ``op_types`` in the main graph and its subgraphs, less excluded ones."""
        for function in self.model.functions.values():
            if any(n.op_type in op_types for n in ir.traversal.RecursiveGraphIterator(function)):
                name = f"{function.domain}::{function.name}"
                logger.debug("%s: skipping function %s: no initializers", self.pass_name, name)
        nodes = []
        for graph in list(self.model.graphs()):
            for node in graph:
                if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
                    continue
                if any(p.fullmatch(node.name or "") for p in self.exclude):
                    self.skip(node, "excluded")
                else:
                    nodes.append(node)
        return nodes

    def skip(self, node: ir.Node, reason: str) -> bool:
        logger.debug("%s: skipping %s (%s): %s", self.pass_name, node.name, node.op_type, reason)
        return False

    def weight_reason(self, value: ir.Value | None) -> str | None:
        """Why ``value`` is not a quantizable weight (2-D float32 constant initializer), or None."""
        if value is None or not value.is_initializer() or value.const_value is None:
            return f"weight {value.name if value else None!r} is not an initializer"
        if value.is_graph_input():
            return f"weight {value.name!r} is a graph input, so callers may override it"
        tensor = value.const_value
        if tensor.dtype != ir.DataType.FLOAT:
            return f"weight {value.name!r} is {tensor.dtype.name}, not FLOAT"
        if len(tensor.shape) != 2:
            return f"weight {value.name!r} has rank {len(tensor.shape)}, not 2"
        if tensor.size < self.min_elements:
            return f"weight {value.name!r} has {tensor.size} < {self.min_elements} elements"
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

    def _initializer(self, graph: ir.Graph, base: str, array: np.ndarray | ir.Tensor) -> ir.Value:
        name, index = base, 1
        while name in self.taken:
            name, index = f"{base}_{index}", index + 1
        self.taken.add(name)
        tensor = array if isinstance(array, ir.Tensor) else ir.Tensor(array)
        tensor.name = name
        value = ir.Value(
            name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype)
        )
        graph.register_initializer(value)
        return value

    def replace(self, old_nodes: list[ir.Node], new_nodes: list[ir.Node]) -> None:
        """Put ``new_nodes`` where ``old_nodes`` were; the last output of each list is the same."""
        graph, last = old_nodes[0].graph, old_nodes[-1]
        assert graph is not None
        old, new = [last.outputs[0]], [new_nodes[-1].outputs[0]]
        ir.convenience.replace_nodes_and_values(graph, last, old_nodes, new_nodes, old, new)

    def drop_dead_weights(self) -> None:
        """Remove float weights that no node or graph output reads any more."""
        for value in self.sources:
            if not value.uses() and not value.is_graph_output() and value.graph is not None:
                assert value.name is not None
                del value.graph.initializers[value.name]


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
        add, bias = _bias_add(node, n)
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


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
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
        add.op_type != "Add"
        or add.domain not in ("", "ai.onnx")
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
