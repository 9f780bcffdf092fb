"""Reshape shapes read from the reshaped tensor itself become constants (``fold``'s helper)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class ReshapeCopiedDimsPass(ir.passes.InPlacePass):
    """Replace a Reshape's computed shape by a constant where its parts are constants or
    dimensions of the Reshape's own input at the same position.

    ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), c))``
    is ``Reshape(x, Concat([0], [0], c))``: with ``allowzero=0`` a 0 copies the input's
    dimension at that index, which is exactly what ``Shape(x)[i]`` at position ``i`` gives
    (torch's ``x.view(x.size(0), x.size(1), heads, -1)``; 72 of MiniLM-L3's 217 nodes).
    The shape-reading chain is then dead and removed. onnxruntime makes the same rewrite
    when it loads a model (ReshapeFusion); in the file, the chain costs bytes.

    Rules:

    1. Only Reshape with ``allowzero`` 0 (or absent) in the default domain, whose shape is a
       ``Concat`` along axis 0 of parts that are each a constant 1-D int64, or
       ``Shape(x)[i]`` of the Reshape's input ``x`` taken at the part's own position ``i``:
       ``Unsqueeze(Gather(Shape(x), i), [0])`` or ``Gather(Shape(x), [i])``, with ``Shape``
       reading from the start (no ``start`` attribute, or 0) and ``i`` non-negative; or
       ``Shape(x)[i:j]`` starting at the part's own position, ``Slice(Shape(x), [i], [j])``
       (axes [0], steps [1] or absent), where the rank of ``x`` is known, so that the dims
       it copies are counted (Paddle's ``flatten``: ``Reshape(x, Concat(Shape(x)[0:2],
       [-1]))``, which onnx shape inference cannot follow at opset 12, so that the MACs of
       every MatMul after it counted one row of 40 on PP-OCRv4 rec).
    2. Anything else is left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for graph in model.graphs():
            for node in list(graph):
                shape = _copied_dims_shape(node)
                if shape is not None:
                    node.replace_input_with(1, _shape_initializer(graph, shape))
                    count += 1
        logger.debug("fold: %d Reshape shapes read from their input made constant", count)
        return ir.passes.PassResult(model, count > 0)


def _copied_dims_shape(node: ir.Node) -> np.ndarray | None:
    """The constant shape equivalent to ``node``'s computed one (rule 1), or None."""
    if node.op_type != "Reshape" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
        return None
    if node.attributes.get_int("allowzero", 0) != 0:
        return None
    data, shape = node.inputs[0], node.inputs[1]
    concat = shape.producer() if shape is not None else None
    if (
        data is None
        or concat is None
        or concat.op_type != "Concat"
        or concat.domain not in DEFAULT_DOMAINS
        or concat.attributes.get_int("axis", 0) != 0
    ):
        return None
    dims: list[int] = []
    for part in concat.inputs:
        values = _int64_constant(part)
        if values is not None and values.ndim == 1:
            dims.extend(int(v) for v in values)
        elif _reads_own_dim(part, data, len(dims)):
            dims.append(0)
        else:
            copied = _own_dims_sliced(part, data, len(dims))
            if copied is None:
                return None
            dims.extend([0] * copied)
    if 0 not in dims:
        return None
    return np.array(dims, np.int64)


def _reads_own_dim(part: ir.Value | None, data: ir.Value, position: int) -> bool:
    """Is ``part`` the 1-element tensor ``Shape(data)[position]`` (rule 1)?"""
    node = part.producer() if part is not None else None
    if node is None or node.domain not in DEFAULT_DOMAINS:
        return False
    if node.op_type == "Unsqueeze":
        axes = (
            _int64_constant(node.inputs[1])
            if len(node.inputs) > 1
            else np.array(node.attributes.get_ints("axes", []), np.int64)
        )
        if axes is None or axes.reshape(-1).tolist() != [0]:
            return False
        gather, scalar = node.inputs[0].producer() if node.inputs[0] else None, True
    else:
        gather, scalar = node, False
    if gather is None or gather.op_type != "Gather" or gather.domain not in DEFAULT_DOMAINS:
        return False
    if gather.attributes.get_int("axis", 0) != 0:
        return False
    index = _int64_constant(gather.inputs[1])
    if (
        index is None
        or index.ndim != (0 if scalar else 1)
        or index.reshape(-1).tolist() != [position]
    ):
        return False
    return _reads_shape_of(gather.inputs[0], data)


def _own_dims_sliced(part: ir.Value | None, data: ir.Value, position: int) -> int | None:
    """How many dims ``part`` copies if it is ``Shape(data)[position:j]`` (rule 1), else None."""
    node = part.producer() if part is not None else None
    if node is None or node.op_type != "Slice" or node.domain not in DEFAULT_DOMAINS:
        return None
    if len(node.inputs) < 3 or not _reads_shape_of(node.inputs[0], data, whole=True):
        return None
    starts, ends = _int64_constant(node.inputs[1]), _int64_constant(node.inputs[2])
    optional = [node.inputs[i] if len(node.inputs) > i else None for i in (3, 4)]
    axes, steps = (_int64_constant(v) if v is not None else None for v in optional)
    if (
        starts is None
        or ends is None
        or starts.reshape(-1).tolist() != [position]
        or ends.size != 1
        or (optional[0] is not None and (axes is None or axes.reshape(-1).tolist() != [0]))
        or (optional[1] is not None and (steps is None or steps.reshape(-1).tolist() != [1]))
        or data.shape is None
    ):
        return None
    copied = min(int(ends.reshape(-1)[0]), len(data.shape)) - position
    return copied if copied > 0 else None


def _reads_shape_of(value: ir.Value | None, data: ir.Value, whole: bool = False) -> bool:
    """Is ``value`` ``Shape(data)`` from its first dim (to its last with ``whole``)?"""
    shape = value.producer() if value is not None else None
    return (
        shape is not None
        and shape.op_type == "Shape"
        and shape.domain in DEFAULT_DOMAINS
        and shape.inputs[0] is data
        and shape.attributes.get_int("start", 0) == 0
        and not (whole and "end" in shape.attributes)
    )


def _int64_constant(value: ir.Value | None) -> np.ndarray | None:
    """The int64 constant (initializer or Constant node) ``value`` holds, or None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.dtype != ir.DataType.INT64:
        return None
    return tensor.numpy()


def _shape_initializer(graph: ir.Graph, shape: np.ndarray) -> ir.Value:
    """An initializer ``shape_<d0>_<d1>...`` holding ``shape``, shared by equal shapes."""
    base = "shape_" + "_".join(str(d) for d in shape)
    taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    name, index = base, 1
    while name in taken or name in graph.initializers:
        existing = graph.initializers.get(name)
        if existing is not None and _same_constant(existing, shape):
            return existing
        name, index = f"{base}_{index}", index + 1
    value = ir.Value(name=name, const_value=ir.tensor(shape, name=name))
    value.shape, value.dtype = ir.Shape(shape.shape), ir.DataType.INT64
    graph.register_initializer(value)
    return value


def _same_constant(value: ir.Value, array: np.ndarray) -> bool:
    """Does initializer ``value`` (not an overridable graph input) hold exactly ``array``?"""
    constant = _int64_constant(value)
    return constant is not None and not value.is_graph_input() and np.array_equal(constant, array)
