"""Which Slice and Reshape nodes read a table: a constant float32 initializer as their data
(a positional encoding), which ``stored_int8`` stores as int8. The others move activations:
no weight pass looks at them, and none counts them as a candidate it skipped
(``weight_nodes``)."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnx_shrink.compiler.walk import nodes_of

TABLE_READERS = ("Slice", "Reshape")
"""Ops whose constant float data input is a table stored as int8"""


def moves_activations(node: ir.Node) -> bool:
    """Whether ``node`` is a Slice or Reshape whose data is not a constant float32
    initializer: it moves activations, and holds no table to store."""
    if node.op_type not in TABLE_READERS:
        return False
    data = node.inputs[0] if node.inputs else None
    tensor = data.const_value if data is not None and data.is_initializer() else None
    return tensor is None or tensor.dtype != ir.DataType.FLOAT


def weight_nodes(model: ir.Model, op_types: Sequence[str]) -> list[ir.Node]:
    """The nodes of ``op_types`` in every graph of ``model`` a weight pass looks at: all but
    the Slice and Reshape nodes that move activations."""
    return [node for node in nodes_of(model, op_types) if not moves_activations(node)]
