"""The layers ``prune`` works on: float weights of MatMul, Gemm and Conv, with the row view
each is pruned in, and why every other weight slot is left (``find_layers``)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.statistics import StatRequest
from onnx_shrink.passes.quant import quantized_already

logger = logging.getLogger("onnx_shrink.passes.prune")

PRUNABLE = frozenset({"MatMul", "Gemm", "Conv"})
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One weight (possibly shared by several nodes) in its row view."""

    weight: ir.Value
    nodes: tuple[ir.Node, ...]
    layout: str  # "kn" (MatMul, Gemm transB=0), "nk" (Gemm transB=1), "conv"

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.weight.name or "?"

    def rows(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "kn":
            return array.T
        if self.layout == "nk":
            return array
        return np.moveaxis(array, 1, -1).reshape(array.shape[0], -1)

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.layout == "kn":
            return rows.T
        if self.layout == "nk":
            return rows
        moved = rows.reshape(shape[0], *shape[2:], shape[1])
        return np.moveaxis(moved, -1, 1)

    def in_main_graph(self, model: ir.Model) -> bool:
        return all(node.graph is model.graph for node in self.nodes)

    def stat_request(self, kind: str) -> list[StatRequest]:
        """One request per node input (a shared weight sums its inputs' statistics)."""
        axis = 1 if self.layout == "conv" else -1
        if kind == "gram":
            return [StatRequest(n.inputs[0].name, "gram") for n in self.nodes]
        return [StatRequest(n.inputs[0].name, "channel_sqnorm", axis=axis) for n in self.nodes]


def _layout(node: ir.Node) -> str | None:
    """The row-view layout of input 1 of ``node``, or None when it is not a plain weight."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or node.domain not in ("", "ai.onnx"):
        return None
    rank = len(weight.const_value.shape)
    if node.op_type == "MatMul" and rank == 2:
        return "kn"
    if node.op_type == "Gemm" and rank == 2:
        if node.attributes.get_int("transA", 0):
            return None  # the input's channels lie on axis 0: no per-channel statistics here
        return "nk" if node.attributes.get_int("transB", 0) else "kn"
    if node.op_type == "Conv" and rank >= 3:
        return "conv"
    return None


def _no_layout_reason(node: ir.Node) -> str:
    """Why ``_layout`` found no plain weight in ``node``."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    first = node.inputs[0] if node.inputs else None
    if first is not None and first.const_value is not None:
        return f"{node.op_type} with its constant on the left (input 0), not pruned"
    if weight is None or weight.const_value is None:
        if quantized_already.integer_weight(weight):
            return f"{node.op_type} weight quantized already"
        producer = weight.producer() if weight is not None else None
        if producer is None or not _from_constants(producer):
            return f"{node.op_type} of two activations (no weight)"
        return f"{node.op_type} weight computed in the graph from constants, not stored"
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain} domain"
    return f"{node.op_type} weight of rank {len(weight.const_value.shape)} or transposed input"


def _from_constants(node: ir.Node, depth: int = 4) -> bool:
    """Whether ``node`` computes from constants alone (within ``depth`` producers): a weight
    dequantized in the graph (Cast and Mul of an int8 constant), not an activation."""
    for value in node.inputs:
        if value is None or value.const_value is not None:
            continue
        producer = value.producer()
        if value.is_graph_input() or producer is None or depth == 0:
            return False
        if not _from_constants(producer, depth - 1):
            return False
    return True


def find_layers(
    model: ir.Model, excluded, min_elements: int, skipped: list[str] | None = None
) -> list[Layer]:
    """Prunable weights: float initializers every use of which is a MatMul/Gemm/Conv weight
    slot with one layout. Shared weights appear once. Why each other weight slot was left
    goes to ``skipped`` and to the log, at -v, where ``skipped`` is given (the pass's apply;
    its requests find the same layers, and said nothing twice)."""
    by_weight: dict[int, list[tuple[ir.Node, str]]] = {}
    for node in walk.all_nodes(model):
        if node.op_type not in PRUNABLE:
            continue
        if (layout := _layout(node)) is not None:
            by_weight.setdefault(id(node.inputs[1]), []).append((node, layout))
        elif skipped is not None:
            reason = _no_layout_reason(node)
            logger.info("prune: skipping %s (%s): %s", node.name, node.op_type, reason)
            skipped.append(reason)
    layers = []
    for uses in by_weight.values():
        node, layout = uses[0]
        weight = node.inputs[1]
        reason = _skip_reason(weight, uses, excluded, min_elements)
        if reason:
            if skipped is not None:
                logger.info("prune: skipping %s (%s): %s", node.name, weight.name, reason)
                skipped.append(reason)
            continue
        layers.append(Layer(weight, tuple(n for n, _ in uses), layout))
    return layers


def _skip_reason(weight: ir.Value, uses, excluded, min_elements: int) -> str | None:
    tensor = weight.const_value
    if not weight.is_initializer() or weight.is_graph_input():
        return "not an initializer (or overridable as a graph input)"
    if tensor.dtype not in FLOAT_TYPES:
        return f"{tensor.dtype} weight"
    if tensor.size < min_elements:
        return f"{tensor.size} elements < min_elements={min_elements}"
    if len({layout for _, layout in uses}) > 1 or len(weight.uses()) != len(uses):
        return "shared with a use that reads it in another layout"
    if any(excluded(node) for node, _ in uses):
        return "excluded"
    return None
