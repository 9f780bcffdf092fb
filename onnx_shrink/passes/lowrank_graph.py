"""The graph side of ``lowrank``: which nodes fit, their weight as a matrix, the rewrite.

For y = x·W (W: K x N, Gemm's transB and a 1x1 Conv's [N, K, 1, 1] kernel read as such),
``split`` writes h = x·A, y = h·B in place of the node, the second node keeping its name and
output. Nothing here chooses a rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.compiler.options import (
    pattern_names,
    warn_unmatched,
    warn_unmatched_exclusions,
)
from onnx_shrink.passes import half_weights
from onnx_shrink.passes.quant import quantized_already

FLOAT_TYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
SPATIAL_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad")


def split_computing(model: ir.Model, output: str, a: np.ndarray, b: np.ndarray) -> None:
    """``split`` of the node that computes the value ``output`` (a probe's edit of a copy of
    the model: value names are unique and copied, where a node may have no name)."""
    node = next(n for n in model.graph if n.outputs and n.outputs[0].name == output)
    split(model.graph, node, a, b)


def check(node: ir.Node, opset: int) -> str:
    """Why ``node`` cannot be split, or ""."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing input"
    x, weight = node.inputs[0], node.inputs[1]
    if x.const_value is not None:
        return "its input is a constant (fold it)"
    if quantized_already.integer_weight(weight):
        return "weight quantized already"
    if weight.const_value is None or weight.is_graph_input():
        return "weight is not a constant"
    if np.dtype(weight.const_value.dtype.numpy()) not in FLOAT_TYPES:
        return f"weight type {weight.const_value.dtype} is not float16/32/64"
    if len(weight.uses()) > 1:
        return f"weight shared by {len(weight.uses())} uses"
    shape = tuple(weight.const_value.shape)
    if node.op_type in ("MatMul", "Gemm") and len(shape) != 2:
        return f"weight has rank {len(shape)}, not 2"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) and opset < 11:
        return "Gemm transA=1 needs opset 11 (optional C) to split"
    if node.op_type == "Conv":
        if len(shape) < 3 or any(d != 1 for d in shape[2:]):
            return f"kernel {shape[2:]} is not 1x1"
        if node.attributes.get_int("group", 1) != 1:
            return "grouped Conv"
    return ""


def weight_matrix(node: ir.Node, dtype: np.dtype | None = np.float64) -> np.ndarray:
    """The weight as W (K x N) with y = x·W (Gemm transB and Conv [N, K, 1, 1] transposed),
    as ``dtype`` (None: as stored, a view where it can be)."""
    array = node.inputs[1].const_value.numpy()
    array = array if dtype is None else array.astype(dtype)
    if node.op_type == "Conv":
        return array.reshape(array.shape[0], array.shape[1]).T
    return array.T if _transposed(node) else array


def matrix_shape(node: ir.Node) -> tuple[int, int]:
    """(K, N) of ``weight_matrix(node)``, read off the stored weight without converting it."""
    shape = node.inputs[1].const_value.shape
    transposed = node.op_type == "Conv" or _transposed(node)
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def split(graph: ir.Graph, node: ir.Node, a: np.ndarray, b: np.ndarray) -> None:
    """Rewrite ``node`` (y = x·W) as h = x·A, y = h·B in place; ``node`` keeps its output."""
    weight = node.inputs[1]
    dtype = weight.const_value.dtype.numpy()
    base, label = weight.name, node.name or weight.name
    rank = a.shape[1]
    attributes: dict[str, object] = {}
    if node.op_type == "Conv":
        ones = (1,) * (weight.const_value.shape.rank() - 2)
        a, b = a.T.reshape(rank, -1, *ones), b.T.reshape(-1, rank, *ones)
        attributes = {k: v.value for k, v in node.attributes.items() if k in SPATIAL_ATTRIBUTES}
        for key in (*SPATIAL_ATTRIBUTES, "kernel_shape"):
            node.attributes.pop(key, None)
        first_op = "Conv"
    elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        first_op, attributes = "Gemm", {"transA": 1}
        node.attributes["transA"] = ir.AttrInt64("transA", 0)
    else:
        first_op = "MatMul"
    if _transposed(node):
        b = b.T
    a_value = graph_edit.add_initializer(
        graph, f"{base}_lowrank_a", np.ascontiguousarray(a.astype(dtype))
    )
    b_value = graph_edit.add_initializer(
        graph, f"{base}_lowrank_b", np.ascontiguousarray(b.astype(dtype))
    )
    for factor in (a_value, b_value):  # stored in half precision again, if the weight was
        half_weights.mark_like(factor, weight)
    hidden = ir.Value(name=f"{base}_lowrank_hidden")
    hidden.dtype = weight.const_value.dtype
    first = ir.node(
        first_op, [node.inputs[0], a_value], attributes, outputs=[hidden], name=f"{label}_lowrank"
    )
    graph.insert_before(node, first)
    node.replace_input_with(0, hidden)
    node.replace_input_with(1, b_value)
    if not weight.uses() and weight.name in graph.initializers:
        graph.initializers.pop(weight.name)


def matches(node: ir.Node, patterns: Sequence[str]) -> bool:
    name = node.name or ""
    return any(pattern_names(p, name) for p in patterns)


def static_rows(node: ir.Node) -> float:
    """Rows of x per sample from static shapes (leading batch dim dropped), else 1."""
    value = node.outputs[0] if node.op_type == "Conv" else node.inputs[0]
    dims = list(value.shape) if value.shape is not None else []
    inner = dims[2:] if node.op_type == "Conv" else dims[1:-1]
    return float(math.prod(inner)) if all(isinstance(d, int) for d in inner) else 1.0


def warn_unmatched_patterns(model: ir.Model, exclude: Sequence[str], only: Sequence[str]) -> None:
    """Warn of ``lowrank.exclude`` and ``lowrank.only`` items that name no node: a typo in
    ``only`` left every layer dense under a reason that said the model had none."""
    warn_unmatched_exclusions(model, "lowrank", exclude)
    if only:
        names = [node.name or "" for node in model.graph]  # only the main graph splits
        warn_unmatched("lowrank.only", only, names)


def none_reason(model: ir.Model, op_types: Sequence[str], only: Sequence[str]) -> str:
    """Why no layer was a candidate: the main graph has none of ``op_types``, or ``only``
    names none of them."""
    kinds = "/".join(op_types)
    present = sum(1 for node in model.graph if node.op_type in op_types)
    if only and present:
        return f"lowrank.only names none of the {present} {kinds} nodes of the main graph"
    return f"no {kinds} in the main graph"
