"""Weights a layer reads through a Transpose, made constants of their own for the weight passes.

A language model that ties its output layer to its embedding table reads one initializer
twice: ``Gather(E, ids)`` and ``MatMul(h, Transpose(E))``. ``fold`` leaves the Transpose
(computing it would store the table twice), so a weight pass found a MatMul on no constant
weight and quantized the Gather's table alone, keeping the float table for the Transpose:
on a tied model from torch's dynamo exporter, quant, quant-dynamic and quant-weight each
wrote a file larger than the input (330,483 -> 342,248 bytes with quant), where onnxruntime's
quantizer, whose pre-processing computes the Transpose, wrote 153,149.

``materialize`` gives such a MatMul (or Gemm) its transposed weight as an initializer, so the
pass quantizes it as any other; ``restore`` puts the Transpose back where the copy stayed float
while the table is still read as float (a layer kept float), which would store both.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit

TRANSPOSED_FROM = "onnx_shrink.transposed_from"
"""``Value.meta`` key of a copy ``materialize`` made: the source initializer, the perm, and
the Transpose's node and output names"""

_LINEAR = ("MatMul", "Gemm")  # the readers given a copy, at graph_edit.WEIGHT_INPUTS


def materialize(model: ir.Model) -> bool:
    """Replace each Transpose of a float initializer whose output only MatMul or Gemm nodes
    read as their weight (input 1) by an initializer holding the transposed tensor, in the
    graph of the Transpose; the source stays where other nodes read it. Returns whether any
    was replaced."""
    changed = False
    taken: set[str] | None = None
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        source = _transposed_weight(node)
        if source is None:
            continue
        graph = node.graph
        assert graph is not None and source.const_value is not None
        taken = graph_edit.value_names(model.graph) if taken is None else taken
        perm = _perm(node, len(source.const_value.shape))
        array = np.ascontiguousarray(source.const_value.numpy().transpose(perm))
        name = graph_edit.fresh_name(f"{source.name}_transposed", taken)
        copy = ir.Value(
            name=name,
            const_value=ir.tensor(array, name=name),
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
        )
        copy.meta[TRANSPOSED_FROM] = (source, perm, node.name, node.outputs[0].name)
        graph.register_initializer(copy)
        ir.convenience.replace_all_uses_with(node.outputs[0], copy)
        graph.remove(node, safe=True)
        if not source.uses() and source.name in graph.initializers:
            graph.initializers.pop(source.name)
        changed = True
    return changed


def restore(model: ir.Model) -> None:
    """Put back the Transpose of each copy ``materialize`` made that is still read as float
    while its source is read too: the model then stores the weight once, as it came."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for copy in list(graph.initializers.values()):
            origin = copy.meta.get(TRANSPOSED_FROM)
            if origin is None or not copy.uses():
                continue
            source, perm, node_name, output_name = origin
            if not source.uses() or source.graph is None:
                continue  # the source is quantized or gone: the copy is the only float one
            transpose = ir.node("Transpose", [source], {"perm": list(perm)}, name=node_name)
            transpose.outputs[0].name = output_name
            # It reads an initializer only: first in the graph is in order.
            if len(graph):
                graph.insert_before(graph[0], transpose)
            else:
                graph.append(transpose)
            ir.convenience.replace_all_uses_with(copy, transpose.outputs[0])
            graph.initializers.pop(copy.name)


def _transposed_weight(node: ir.Node) -> ir.Value | None:
    """The float initializer ``node`` transposes for MatMul/Gemm weights only, or None."""
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    source, out = node.inputs[0], node.outputs[0]
    if source is None or source.const_value is None or not source.is_initializer():
        return None
    if source.is_graph_input() or source.const_value.dtype != ir.DataType.FLOAT:
        return None
    uses = list(out.uses())
    if out.is_graph_output() or not uses:
        return None
    if not all(
        use.node.op_type in _LINEAR and graph_edit.WEIGHT_INPUTS[use.node.op_type] == use.idx
        for use in uses
    ):
        return None
    return source


def _perm(node: ir.Node, rank: int) -> tuple[int, ...]:
    """The Transpose's perm: its attribute, or the axes reversed (ONNX's default)."""
    perm = node.attributes.get_ints("perm", None)
    return tuple(perm) if perm is not None else tuple(reversed(range(rank)))
