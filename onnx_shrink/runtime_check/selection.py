"""Outputs whose rows a selection chooses and orders, and the values it chose them from.

An NMS-free detector (isbnx's YOLOv10-style barcode model) ends in ``TopK``: of 8400 anchors it
keeps the 300 best scored, sorted, and gathers their boxes and classes into ``[N, 300, 6]``.
Most of those 300 score about 0: any change to the model (fp16, int8) makes near-equal scores
trade places, and the rows compared element by element then hold other anchors' boxes.
Its fp16 model read relative error 0.639 (cosine 0.79) with the same detections (top score
0.954 -> 0.955, boxes within 0.2 px), and ``quant.max_error=0.05`` chased that reordering: it
kept 135 nodes float, a 9.3 MiB model for 2.7 MiB, to meet it.

So an output is *ordered by a selection* when a ``TopK``'s result reaches it through ops that
only arrange values or compute indices (``ARRANGES``: gathers, joins, reshapes, index
arithmetic) and it has an axis of the TopK's constant ``k``: the chosen rows. A TopK whose
result is mixed into the values (a mixture of experts' router, through a MatMul or a
reduction) orders nothing. Its *sources* are the float values the selection machinery reads
that no selection has reordered yet: the scores ``TopK`` ranks and the boxes and classes a
``Gather`` takes rows of, one per anchor, comparable element by element. The accuracy target, the
sensitivity report and the low-rank probe measure those in its place
(``combined.add_scored_outputs``); the check says why its error overstates the change
(``check_notes``).
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_shrink.runtime_check.layers import FLOAT_TYPES

ARRANGES = frozenset(
    {
        "Gather", "GatherElements", "GatherND", "Concat", "Split", "Slice", "Reshape",
        "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Tile", "Expand", "Identity", "Cast",
        # index arithmetic: a class from a flat index (Mod), a row of the batch (Add, Mul)
        "Add", "Sub", "Mul", "Div", "Mod",
    }
)  # fmt: skip
"""Ops through which a TopK's order carries: they move values or compute indices."""


def ordered_outputs(graph: ir.Graph) -> dict[ir.Value, ir.Node]:
    """The float outputs of ``graph`` a TopK's result reaches through ``ARRANGES`` that have
    an axis of its constant ``k``, each with the last such TopK on the way (the one named to
    the user)."""
    ordered = _ordered_values(graph)
    result: dict[ir.Value, ir.Node] = {}
    for value in graph.outputs:
        if value not in ordered or value.dtype not in FLOAT_TYPES or value.shape is None:
            continue
        topk = _nearest_selection(value, ordered)
        if topk is not None and _kept(topk) in tuple(value.shape):
            result[value] = topk
    return result


def _kept(topk: ir.Node) -> int | None:
    """The TopK's ``k``, where a constant (an initializer or a Constant node) gives it."""
    k = topk.inputs[1] if len(topk.inputs) > 1 else None
    tensor = ir.convenience.get_const_tensor(k) if k is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return int(tensor.numpy().reshape(-1)[0])


def describe(topk: ir.Node) -> str:
    """The selection as the check and the logs name it: "TopK '<name>'"."""
    return f"{topk.op_type} '{topk.name}'"


def sources(graph: ir.Graph, *outputs: ir.Value) -> list[ir.Value]:
    """The float values computed by ``graph`` that the selection machinery upstream of
    ``outputs`` reads and that no selection has ordered: walking back from each ordered one
    over ordered values, each computed float input that is not ordered, once each. [] where
    none is ordered."""
    ordered = _ordered_values(graph)
    found: dict[ir.Value, None] = {}
    seen: set[ir.Value] = set()
    frontier = [output for output in outputs if output in ordered]
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        node = value.producer()
        if node is None:
            continue
        for source in node.inputs:
            if source is None or source.producer() is None:
                continue
            if source in ordered:
                frontier.append(source)
            elif source.dtype in FLOAT_TYPES:
                found[source] = None
    return list(found)


def _ordered_values(graph: ir.Graph) -> set[ir.Value]:
    """The values of ``graph`` (main graph) a TopK's result reaches through ``ARRANGES``."""
    ordered: set[ir.Value] = set()
    for node in graph:  # topological order: a node's inputs are decided before it
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "TopK" or (
            node.op_type in ARRANGES and any(v is not None and v in ordered for v in node.inputs)
        ):
            ordered.update(v for v in node.outputs if v is not None)
    return ordered


def _nearest_selection(value: ir.Value, ordered: set[ir.Value]) -> ir.Node | None:
    """The first selection met walking back from ``value`` over ordered values."""
    seen: set[ir.Value] = set()
    frontier = [value]
    while frontier:
        next_frontier = []
        for current in frontier:
            node = current.producer()
            if node is None or current in seen:
                continue
            seen.add(current)
            if node.op_type == "TopK":
                return node
            next_frontier += [v for v in node.inputs if v is not None and v in ordered]
        frontier = next_frontier
    return None
