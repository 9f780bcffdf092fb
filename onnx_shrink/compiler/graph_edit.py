"""Small edits every rewriting pass makes: names no value has yet, and new initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def value_names(graph: ir.Graph) -> set[str]:
    """The names of ``graph``'s values and those of the graphs inside it (If/Loop/Scan
    bodies): inputs, initializers and node outputs."""
    taken: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        taken.update(v.name for v in (*g.inputs, *g.initializers.values()) if v.name)
        taken.update(v.name for node in g for v in node.outputs if v.name)
    return taken


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_<i>`` with the first ``i`` not in ``taken``; added to ``taken``."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` registered in ``graph`` as the initializer ``name`` (the caller makes the
    name unique), with its shape and dtype on the value."""
    # ir.Tensor, not ir.tensor: that one's isinstance check against the tensor Protocol costs
    # ~0.1 ms a call, a tenth of quantizing a detector's ~500 constants.
    value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value
