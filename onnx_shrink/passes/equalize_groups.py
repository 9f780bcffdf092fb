"""Channel groups that can be *scaled*: where ``channel_groups`` asks which channels must be
removed together, this asks which can be divided by a positive factor ``s`` in the layers
that make them and multiplied by it in the layers that read them, leaving every output of
the model as it was (up to float rounding).

A group grows, as for pruning (``group_growth.analyse``), from the output channels of a
Conv, Gemm, MatMul with a constant weight, or LayerNormalization, but only through ops that
commute with a positive per-channel factor: ``f(x / s) = f(x) / s`` (Relu, LeakyRelu,
PRelu, pooling, Resize, Concat, Split, reshapes, a Mul or Div by a constant, an Add or Sub
of two members or of a per-channel constant, which is divided too). Sigmoid, Clip, Softmax,
normalizations, a product of two computed tensors and anything unknown decline the group.

Each constant the group touches is a ``ScaledSlice``: a producer's weight rows and bias and
an added constant are divided by ``s`` (``power`` -1), a reader's weight columns multiplied
by it (``power`` +1). A depthwise Conv is a producer of its output channels and a reader of
its input channels, never a passage: both ends keep their scales in their own weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_shrink.passes.channel_groups import (
    Context,
    Decline,
    Key,
    ParamSlice,
    Relation,
    attr_int,
    concat,
    constant,
    normalize,
    reduce_or_squeeze,
    reshape,
    split,
    transpose,
    unary,
    who,
)

ROOTS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LayerNormalization"})
"""ops whose output channels a group grows from"""

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "Identity", "Dropout"})
"""elementwise ops with f(x / s) = f(x) / s for s > 0"""

POOLING = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample"}
)
"""ops that mix values within a channel linearly, or pick among them"""

REDUCTIONS = frozenset(
    {"Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"}
)
"""reductions over other axes that commute with a positive factor (not ReduceProd)"""


@dataclasses.dataclass(frozen=True)
class ScaledSlice(ParamSlice):
    """Input ``index`` of ``node`` (a constant) is multiplied by ``s ** power`` along
    ``axis``: -1 for what produces the channels, +1 for the weights that read them."""

    power: int = -1


def _slice(node: ir.Node, index: int, axis: int, key: Key, power: int, source=False):
    return ScaledSlice(node, index, axis, key.start, key.unit, source, power)


def conv(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """A Conv or ConvTranspose (group 1) or depthwise Conv: output channels are produced
    (weight rows and bias divided), input channels read (weight columns multiplied)."""
    weight = constant(node.inputs[1])
    if weight is None:
        raise Decline(f"{who(node)}: Conv weight is not constant")
    if key.value is not node.inputs[0] and key.value is not node.outputs[0]:
        raise Decline(f"{who(node)}: channels reach a Conv's weight or bias")
    if key.axis != 1:
        raise Decline(f"{who(node)}: channels on axis {key.axis} of a Conv")
    group = attr_int(node, "group", 1)
    transpose_ = node.op_type == "ConvTranspose"
    depthwise = group > 1 and not transpose_ and weight.shape[:2] == (group, 1)
    if group != 1 and not depthwise:
        raise Decline(f"{who(node)}: grouped Conv (group={group}) that is not depthwise")
    out_axis, in_axis = (1, 0) if transpose_ else (0, 1)
    if key.value is node.outputs[0]:
        params = [_slice(node, 1, out_axis, key, -1, source=True)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            params.append(_slice(node, 2, 0, key, -1))
        return Relation(params=params, source=True)
    return Relation(params=[_slice(node, 1, 0 if depthwise else in_axis, key, +1)])


def gemm(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Gemm on a constant weight: output columns produced, input columns read."""
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    if constant(node.inputs[1]) is None:
        raise Decline(f"{who(node)}: Gemm weight is not constant")
    if key.value is node.outputs[0] and key.axis == 1:
        weight = _slice(node, 1, 0 if trans_b else 1, key, -1, True)
        relation = Relation(params=[weight], source=True)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            dims = ctx.dims(bias)
            if bias.const_value is None or not dims or dims[-1] == 1:
                raise Decline(f"{who(node)}: Gemm bias is computed or not per column")
            relation.params.append(_slice(node, 2, len(dims) - 1, key, -1))
        return relation
    if key.value is node.inputs[0] and key.axis == (0 if trans_a else 1):
        return Relation(params=[_slice(node, 1, 1 if trans_b else 0, key, +1)])
    raise Decline(f"{who(node)}: channels on the rows of a Gemm")


def matmul(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """MatMul of an activation [..., K] by a constant [K, N]: N produced, K read. A product
    of two computed tensors declines: both factors would carry ``s``."""
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    if b.const_value is None or a is b or ctx.rank(b) < 2:
        raise Decline(f"{who(node)}: MatMul of two computed tensors")
    rank_b = ctx.rank(b)
    if key.value is out and key.axis == ctx.rank(out) - 1:
        return Relation(params=[_slice(node, 1, rank_b - 1, key, -1, True)], source=True)
    if key.value is a and key.axis == ctx.rank(a) - 1:
        return Relation(params=[_slice(node, 1, rank_b - 2, key, +1)])
    raise Decline(f"{who(node)}: channels on axis {key.axis} of a MatMul")


def layer_norm(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """LayerNormalization over the last axis produces its channels: scale and bias divided.
    Its input is normalized, so channels cannot pass into it."""
    if key.value is not node.outputs[0]:
        raise Decline(f"{who(node)}: channels reach a LayerNormalization's input")
    rank = ctx.rank(key.value)
    if attr_int(node, "axis", -1) % rank != rank - 1 or key.axis != rank - 1:
        raise Decline(f"{who(node)}: LayerNormalization over more than the channel axis")
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise Decline(f"{who(node)}: LayerNormalization's mean or deviation is used")
    params = []
    for index in (1, 2):
        if len(node.inputs) > index and node.inputs[index] is not None:
            value = node.inputs[index]
            if constant(value) is None or ctx.dims(value)[-1] == 1:
                raise Decline(f"{who(node)}: LayerNormalization's scale or bias is not per channel")
            params.append(_slice(node, index, ctx.rank(value) - 1, key, -1, index == 1))
    return Relation(params=params, source=True)


def pooling(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Pooling and Resize on the channel axis 1 (the sizes a Resize may be given change the
    spatial axes only: the channels keep their count)."""
    if key.axis != 1:
        raise Decline(f"{who(node)}: channels on axis {key.axis} of {node.op_type}")
    return unary(ctx, node, key)


def _fixed(value: ir.Value) -> np.ndarray | None:
    """``value``'s numbers where it is a constant: an initializer or a Constant node's output
    (which fold leaves where making it an initializer does not pay)."""
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _other(node: ir.Node, key: Key) -> list[tuple[int, ir.Value]]:
    return [(i, v) for i, v in enumerate(node.inputs) if v is not None and v is not key.value]


def add(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Add/Sub: a computed operand joins the group, a per-channel constant is divided too;
    a constant or computed operand broadcast across the channels declines (it would need a
    different value per channel)."""
    out = node.outputs[0]
    rank_out = ctx.rank(out)
    axis = key.axis if key.value is out else key.axis + rank_out - ctx.rank(key.value)
    relation = Relation([key.on(out, axis)] if key.value is not out else [])
    for index, value in _other(node, key):
        local = axis - (rank_out - ctx.rank(value))
        across = local < 0 or ctx.dims(value)[local] == 1
        numbers = _fixed(value)
        if numbers is not None:
            if across and np.any(numbers):
                raise Decline(f"{who(node)}: adds one constant to every channel")
            if not across:
                relation.params.append(_slice(node, index, local, key, -1))
        elif across:
            raise Decline(f"{who(node)}: adds a tensor broadcast across the channels")
        else:
            relation.keys.append(key.on(value, local))
    return relation


def multiply(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Mul, Div (dividend) and PRelu (input) by a constant: the channels pass unchanged."""
    if node.op_type in ("Div", "PRelu") and key.value is node.inputs[1]:
        raise Decline(f"{who(node)}: channels reach the divisor or slope of {node.op_type}")
    computed = [v for _, v in _other(node, key) if _fixed(v) is None]
    if key.value is node.outputs[0]:
        inputs = [v for v in node.inputs if v is not None and _fixed(v) is None]
        if len(inputs) != 1:
            raise Decline(f"{who(node)}: {node.op_type} of two computed tensors")
        out_rank, in_rank = ctx.rank(key.value), ctx.rank(inputs[0])
        return Relation([key.on(inputs[0], key.axis - out_rank + in_rank)])
    if computed:
        raise Decline(f"{who(node)}: {node.op_type} of two computed tensors")
    out = node.outputs[0]
    return Relation([key.on(out, key.axis + ctx.rank(out) - ctx.rank(key.value))])


RULES: dict[str, Callable[[Context, ir.Node, Key], Relation]] = {
    **dict.fromkeys(HOMOGENEOUS, unary),
    **dict.fromkeys(POOLING, pooling),
    **dict.fromkeys(REDUCTIONS, reduce_or_squeeze),
    **dict.fromkeys(("Conv", "ConvTranspose"), conv),
    **dict.fromkeys(("Reshape", "Flatten"), reshape),
    **dict.fromkeys(("Add", "Sub"), add),
    **dict.fromkeys(("Mul", "Div", "PRelu"), multiply),
    "Gemm": gemm,
    "MatMul": matmul,
    "LayerNormalization": layer_norm,
    "Transpose": transpose,
    "Concat": concat,
    "Split": split,
    "Slice": normalize,  # along other axes only
}
"""how each op a scalable group may cross relates its channels (``group_growth._relate``
calls them)"""
