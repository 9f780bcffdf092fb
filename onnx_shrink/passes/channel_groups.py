"""Channel-dependency groups: which channel axes of an ONNX graph must shrink together.

A *key* is a run of channels on one axis of one tensor: ``length`` elements from ``start``,
``unit`` contiguous elements per channel (a whole attention head is one channel of ``head_dim``
elements). A group grows from the output channels of one producer (Conv, ConvTranspose, Gemm,
MatMul with a constant weight) by relating every node that touches a key (``rules``) until
nothing new is reached; every key of a group holds the same number of channels, and removing
channel ``j`` everywhere in the group leaves every other output unchanged. A group that reaches
something it cannot prove safe (a graph input or output, a Shape consumer, an unknown op) is
declined with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

logger = logging.getLogger(__name__)

Dim = int | str | None
SOURCE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class Decline(Exception):  # noqa: N818 - a verdict, not an error
    """A group cannot be pruned; the message says why."""


def who(node: ir.Node) -> str:
    """A node as a decline names it: its name, or its op type where it has none."""
    return node.name or f"<unnamed {node.op_type}>"


class Restart(Exception):  # noqa: N818 - control flow
    """The group must be regrown with a channel unit ``factor`` times coarser (whole heads)."""

    def __init__(self, factor: int) -> None:
        super().__init__(factor)
        self.factor = factor


@dataclasses.dataclass(frozen=True)
class Key:
    value: ir.Value
    axis: int
    start: int
    length: int
    unit: int

    @property
    def channels(self) -> int:
        return self.length // self.unit

    def on(self, value: ir.Value, axis: int, offset: int = 0) -> Key:
        """The same channels on another tensor's axis, shifted by ``offset`` elements."""
        return Key(value, axis, self.start + offset, self.length, self.unit)


@dataclasses.dataclass(frozen=True)
class ParamSlice:
    """Input ``index`` of ``node`` (a constant) loses the group's channels along ``axis``."""

    node: ir.Node
    index: int
    axis: int
    start: int
    unit: int
    source: bool = False
    """a producer's weight: its channel norms score the group"""


@dataclasses.dataclass(frozen=True)
class Edit:
    """A number in ``node`` that counts elements of the group's axis: ``kind`` is "shape"
    (Reshape's shape input at ``position``), "split" (output ``position``'s size) or "group"
    (a depthwise Conv's group count); it drops by ``factor`` per removed channel."""

    node: ir.Node
    kind: str
    position: int
    factor: int


@dataclasses.dataclass
class Relation:
    keys: list[Key] = dataclasses.field(default_factory=list)
    params: list[ParamSlice] = dataclasses.field(default_factory=list)
    edits: list[Edit] = dataclasses.field(default_factory=list)
    source: bool = False


class Context:
    """Shapes (inferred on a clone) and constants of the model being analysed."""

    def __init__(self, model: ir.Model, heads: bool) -> None:
        self.graph = model.graph
        self.heads = heads
        self.opset = model.opset_imports.get("", 17)
        clone = model.clone()
        try:
            common_passes.ShapeInferencePass(strict_mode=False)(clone)
        except Exception as e:  # noqa: BLE001 - unknown shapes decline their groups
            logger.info("prune-channels: shape inference failed (%s)", e)
        self._dims: dict[str, tuple[Dim, ...]] = {}
        for node in clone.graph:
            for value in (*node.inputs, *node.outputs):
                if value is not None and value.name and value.shape is not None:
                    self._dims[value.name] = tuple(_dim(d) for d in value.shape)
        for value in (*clone.graph.inputs, *clone.graph.outputs):
            if value.shape is not None:
                self._dims[value.name] = tuple(_dim(d) for d in value.shape)

    def dims(self, value: ir.Value) -> tuple[Dim, ...]:
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        dims = self._dims.get(value.name or "")
        if dims is None:
            raise Decline(f"unknown shape of {value.name}")
        return dims

    def rank(self, value: ir.Value) -> int:
        return len(self.dims(value))

    def dim(self, value: ir.Value, axis: int) -> int:
        d = self.dims(value)[axis]
        if not isinstance(d, int):
            raise Decline(f"axis {axis} of {value.name} is not static")
        return d


def _dim(d: object) -> Dim:
    if isinstance(d, int):
        return d
    return str(d) if d is not None and str(d) else None


def constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def attr_int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)


# ---- rules: how one node relates a key on one of its tensors to keys on the others ----

UNARY = frozenset(
    "Relu Clip Sigmoid HardSigmoid HardSwish Tanh Erf Gelu LeakyRelu Elu Selu Celu Softplus "
    "Softsign Mish Identity Cast Neg Abs Exp Log Sqrt Reciprocal Sin Cos Floor Ceil Round Sign "
    "ThresholdedRelu Dropout".split()
)
ELEMENTWISE = frozenset("Add Sub Mul Div Pow Max Min Sum Mean Where PRelu".split())
SPATIAL = frozenset(
    "MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool Resize Upsample".split()
)


def _only(node: ir.Node, key: Key, index: int = 0) -> None:
    """Decline unless ``key`` is on input ``index`` or output 0 and no other output is used."""
    if key.value is not node.inputs[index] and key.value is not node.outputs[0]:
        raise Decline(f"{who(node)}: channels reach a secondary input of {node.op_type}")
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise Decline(f"{who(node)}: secondary output of {node.op_type} is used")


def _across(node: ir.Node, key: Key, axis_in: int, axis_out: int) -> Relation:
    """Input 0's ``axis_in`` is the output's ``axis_out``; relate the other side."""
    if key.value is node.outputs[0]:
        if key.axis != axis_out:
            raise Decline(f"{who(node)}: channel axis {key.axis} of {node.op_type}'s output")
        return Relation([key.on(node.inputs[0], axis_in)])
    if key.axis != axis_in:
        raise Decline(f"{who(node)}: channel axis {key.axis} of {node.op_type}'s input")
    return Relation([key.on(node.outputs[0], axis_out)])


def unary(ctx: Context, node: ir.Node, key: Key) -> Relation:
    _only(node, key)
    return _across(node, key, key.axis, key.axis)


def spatial(ctx: Context, node: ir.Node, key: Key) -> Relation:
    _only(node, key)
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
        raise Decline(f"{who(node)}: Resize with explicit sizes")
    return _across(node, key, 1, 1)


def elementwise(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Broadcasting ops: full-size inputs join the group, per-channel constants are sliced."""
    out = node.outputs[0]
    rank_out = ctx.rank(out)
    axis = key.axis if key.value is out else key.axis + rank_out - ctx.rank(key.value)
    relation = Relation([key.on(out, axis)])
    for index, value in enumerate(node.inputs):
        if value is None or value is key.value:
            continue
        local = axis - (rank_out - ctx.rank(value))
        if local < 0 or ctx.dims(value)[local] == 1:
            continue  # broadcast along the channel axis: nothing to slice
        if value.const_value is not None:
            relation.params.append(ParamSlice(node, index, local, key.start, key.unit))
        else:
            relation.keys.append(key.on(value, local))
    return relation


def batch_norm(ctx: Context, node: ir.Node, key: Key) -> Relation:
    _only(node, key)
    relation = _across(node, key, 1, 1)
    count = 5 if node.op_type == "BatchNormalization" else 3
    relation.params = [ParamSlice(node, i, 0, key.start, key.unit) for i in range(1, count)]
    return relation


def conv(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Conv: output channels are a source, input channels a sink; depthwise passes through."""
    weight = constant(node.inputs[1])
    if weight is None:
        raise Decline(f"{who(node)}: Conv weight is not constant")
    group = attr_int(node, "group", 1)
    transpose = node.op_type == "ConvTranspose"
    out_axis, in_axis = (1, 0) if transpose else (0, 1)
    bias = [ParamSlice(node, 2, 0, key.start, key.unit)] if len(node.inputs) > 2 else []
    if key.value is node.inputs[1] or key.axis != 1:
        raise Decline(f"{who(node)}: channels on axis {key.axis} of a Conv")
    if group == 1:
        if key.value is node.outputs[0]:
            w = ParamSlice(node, 1, out_axis, key.start, key.unit, source=True)
            return Relation(params=[w, *bias], source=True)
        return Relation(params=[ParamSlice(node, 1, in_axis, key.start, key.unit)])
    if transpose or weight.shape[0] != group or weight.shape[1] != 1:
        raise Decline(f"{who(node)}: grouped Conv (group={group}) that is not depthwise")
    relation = _across(node, key, 1, 1)
    relation.params = [ParamSlice(node, 1, 0, key.start, key.unit), *bias]
    relation.edits = [Edit(node, "group", 0, key.unit)]
    return relation


def gemm(ctx: Context, node: ir.Node, key: Key) -> Relation:
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    if constant(node.inputs[1]) is None:
        raise Decline(f"{who(node)}: Gemm weight is not constant")
    if key.value is node.outputs[0] and key.axis == 1:
        params = [ParamSlice(node, 1, 0 if trans_b else 1, key.start, key.unit, source=True)]
        relation = Relation(params=params, source=True)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and ctx.dims(bias) and ctx.dims(bias)[-1] != 1:
            if bias.const_value is None:
                raise Decline(f"{who(node)}: Gemm bias is computed")
            relation.params.append(ParamSlice(node, 2, ctx.rank(bias) - 1, key.start, key.unit))
        return relation
    if key.value is node.inputs[0] and key.axis == (0 if trans_a else 1):
        return Relation(params=[ParamSlice(node, 1, 1 if trans_b else 0, key.start, key.unit)])
    raise Decline(f"{who(node)}: channels on the rows of a Gemm")


def matmul(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """[..., M, K] @ [..., K, N]: N is a source (constant B), K a sink; batch axes (heads)
    pass through and join both operands."""
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    if a is b or ra < 2 or rb < 2:
        raise Decline(f"{who(node)}: MatMul with a vector or squared operand")
    side = {id(a): ("a", ra), id(b): ("b", rb), id(out): ("out", ro)}[id(key.value)]
    role, rank = side
    axis = key.axis - rank  # negative: -1 last, -2 second to last, less: batch
    if axis <= -3:
        relation = Relation()
        for value, r in ((a, ra), (b, rb), (out, ro)):
            local = r + axis
            if value is not key.value and local >= 0 and ctx.dims(value)[local] != 1:
                if value.const_value is not None:
                    raise Decline(f"{who(node)}: batched MatMul with a constant operand")
                relation.keys.append(key.on(value, local))
        return relation
    if (role, axis) == ("out", -2) or (role, axis) == ("a", -2):
        other, local = (a, ra - 2) if role == "out" else (out, ro - 2)
        return Relation([key.on(other, local)])
    if (role, axis) in (("out", -1), ("b", -1)):
        if role == "out" and b.const_value is not None:
            return Relation(
                params=[ParamSlice(node, 1, rb - 1, key.start, key.unit, True)], source=True
            )
        return Relation([key.on(out if role == "b" else b, (ro if role == "b" else rb) - 1)])
    # K: the contracted axis, a's last and b's second to last
    if role == "a" and b.const_value is not None:
        return Relation(params=[ParamSlice(node, 1, rb - 2, key.start, key.unit)])
    return Relation([key.on(b, rb - 2) if role == "a" else key.on(a, ra - 1)])


def transpose(ctx: Context, node: ir.Node, key: Key) -> Relation:
    perm = node.attributes.get_ints("perm", None) or list(reversed(range(ctx.rank(key.value))))
    if key.value is node.outputs[0]:
        return _across(node, key, perm[key.axis], key.axis)
    return _across(node, key, key.axis, list(perm).index(key.axis))


def reshape(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Reshape/Flatten that keeps the dims before the channel axis: the axis maps to itself,
    merges with the dims after it (unit grows), or splits into heads (unit shrinks)."""
    _only(node, key)
    src, dst = node.inputs[0], node.outputs[0]
    forward = key.value is src
    before, after = (ctx.dims(src), ctx.dims(dst)) if forward else (ctx.dims(dst), ctx.dims(src))
    a = key.axis
    if None in before[: a + 1] or tuple(before[:a]) != tuple(after[:a]) or len(after) <= a:
        raise Decline(f"{who(node)}: Reshape moves the dims before the channel axis")
    merged = _span(before[a:], after[a])  # before[a:a+k] -> after[a]
    split = _span(after[a:], before[a])  # before[a] -> after[a:a+k]
    if merged is not None:
        factor = int(np.prod(before[a + 1 : a + merged]))
        new = Key(
            node.outputs[0] if forward else src,
            a,
            key.start * factor,
            key.length * factor,
            key.unit * factor,
        )
    elif split is not None:
        inner = int(np.prod(after[a + 1 : a + split]))
        if key.start != 0 or key.length != before[a]:
            raise Decline(f"{who(node)}: Reshape splits a channel segment")
        if key.unit % inner:
            if not ctx.heads:
                raise Decline(f"{who(node)}: Reshape splits channels into heads (heads=False)")
            raise Restart(inner // math.gcd(inner, key.unit))
        new = Key(dst if forward else src, a, 0, after[a], key.unit // inner)
    else:
        raise Decline(f"{who(node)}: Reshape regroups the channel axis")
    out_key = new if forward else key
    return Relation([new], edits=_shape_edit(node, out_key))


def _span(dims: tuple[Dim, ...], total: Dim) -> int | None:
    """k such that prod(dims[:k]) == total, the dims after matching too; None if none."""
    if not isinstance(total, int):
        return 1 if dims and dims[0] == total else None
    product = 1
    for k, d in enumerate(dims, 1):
        if not isinstance(d, int):
            return None
        product *= d
        if product == total:
            return k
        if product > total:
            return None
    return None


def _shape_edit(node: ir.Node, out_key: Key) -> list[Edit]:
    if node.op_type == "Flatten":
        return []
    shape = constant(node.inputs[1])
    if shape is None:
        raise Decline(f"{who(node)}: Reshape shape is computed")
    wanted = shape[out_key.axis]
    if wanted == -1:
        return []
    if wanted == 0:
        raise Decline(f"{who(node)}: Reshape copies a changed dim (0 in its shape)")
    return [Edit(node, "shape", out_key.axis, out_key.unit)]


def concat(ctx: Context, node: ir.Node, key: Key) -> Relation:
    out = node.outputs[0]
    axis = attr_int(node, "axis", 0) % ctx.rank(out)
    if key.axis != axis:
        return Relation([key.on(v, key.axis) for v in (*node.inputs, out) if v is not key.value])
    offsets = np.cumsum([0] + [ctx.dim(v, axis) for v in node.inputs])
    if key.value is not out:
        index = next(i for i, v in enumerate(node.inputs) if v is key.value)
        if node.inputs.count(key.value) > 1:
            raise Decline(f"{who(node)}: the same tensor is concatenated twice")
        return Relation([key.on(out, axis, int(offsets[index]))])
    for index, value in enumerate(node.inputs):
        if offsets[index] <= key.start and key.start + key.length <= offsets[index + 1]:
            return Relation([key.on(value, axis, -int(offsets[index]))])
    raise Decline(f"{who(node)}: channels span several Concat inputs")


def split(ctx: Context, node: ir.Node, key: Key) -> Relation:
    src = node.inputs[0]
    axis = attr_int(node, "axis", 0) % ctx.rank(src)
    if key.value is not src and key.value not in node.outputs:
        raise Decline(f"{who(node)}: channels reach Split's sizes")
    if key.axis != axis:
        return Relation([key.on(v, key.axis) for v in (src, *node.outputs) if v is not key.value])
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        raise Decline(f"{who(node)}: Split along the channel axis without constant sizes")
    offsets = np.cumsum([0] + [ctx.dim(v, axis) for v in node.outputs])
    if key.value is src:
        for index, value in enumerate(node.outputs):
            if offsets[index] <= key.start and key.start + key.length <= offsets[index + 1]:
                moved = key.on(value, axis, -int(offsets[index]))
                return Relation([moved], edits=[Edit(node, "split", index, key.unit)])
        raise Decline(f"{who(node)}: channels span several Split outputs")
    index = list(node.outputs).index(key.value)
    return Relation(
        [key.on(src, axis, int(offsets[index]))], edits=[Edit(node, "split", index, key.unit)]
    )


def _axes(ctx: Context, node: ir.Node, rank: int) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        given = constant(node.inputs[1])
        if given is None:
            raise Decline(f"{who(node)}: {node.op_type} axes are computed")
        axes = given.tolist()
    return None if axes is None else [int(a) % rank for a in axes]


def reduce_or_squeeze(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Reduce*, Squeeze, Unsqueeze: axes other than the channel axis come and go."""
    _only(node, key)
    src, out = node.inputs[0], node.outputs[0]
    unsqueeze = node.op_type == "Unsqueeze"
    wide = out if unsqueeze else src
    axes = _axes(ctx, node, ctx.rank(wide))
    if axes is None:
        if node.op_type == "Squeeze":
            axes = [i for i, d in enumerate(ctx.dims(src)) if d == 1]
        elif attr_int(node, "noop_with_empty_axes", 0):
            return unary(ctx, node, key)
        else:
            raise Decline(f"{who(node)}: {node.op_type} over every axis")
    if node.op_type.startswith("Reduce") and attr_int(node, "keepdims", 1):
        if key.axis in axes:
            raise Decline(f"{who(node)}: {node.op_type} over the channel axis")
        return _across(node, key, key.axis, key.axis)
    wide_axis = key.axis if key.value is wide else _widen(key.axis, axes)
    if wide_axis in axes:
        raise Decline(f"{who(node)}: {node.op_type} over the channel axis")
    narrow_axis = wide_axis - sum(a < wide_axis for a in axes)
    axis_in, axis_out = (narrow_axis, wide_axis) if unsqueeze else (wide_axis, narrow_axis)
    return _across(node, key, axis_in, axis_out)


def _widen(axis: int, removed: list[int]) -> int:
    for a in sorted(removed):
        if a <= axis:
            axis += 1
    return axis


def normalize(ctx: Context, node: ir.Node, key: Key) -> Relation:
    """Softmax, LayerNormalization, Slice: fine while they work on other axes."""
    _only(node, key)
    rank = ctx.rank(key.value)
    if node.op_type == "Slice":
        touched = _axes_input(node, 3, rank)
    elif node.op_type == "LayerNormalization":
        touched = list(range(attr_int(node, "axis", -1) % rank, rank))
    else:
        default = -1 if ctx.opset >= 13 else 1
        axis = attr_int(node, "axis", default) % rank
        touched = [axis] if ctx.opset >= 13 else list(range(axis, rank))
    if key.axis in touched:
        raise Decline(f"{who(node)}: {node.op_type} works on the channel axis")
    return _across(node, key, key.axis, key.axis)


def _axes_input(node: ir.Node, index: int, rank: int) -> list[int]:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return list(range(rank))
    axes = constant(node.inputs[index])
    if axes is None:
        raise Decline(f"{who(node)}: Slice axes are computed")
    return [int(a) % rank for a in axes]


RULES: dict[str, Callable[[Context, ir.Node, Key], Relation]] = {
    **dict.fromkeys(UNARY, unary),
    **dict.fromkeys(ELEMENTWISE, elementwise),
    **dict.fromkeys(SPATIAL, spatial),
    **dict.fromkeys(("BatchNormalization", "InstanceNormalization"), batch_norm),
    **dict.fromkeys(("Conv", "ConvTranspose"), conv),
    **dict.fromkeys(("Reshape", "Flatten"), reshape),
    **dict.fromkeys(("Squeeze", "Unsqueeze"), reduce_or_squeeze),
    **dict.fromkeys(
        ("ReduceMean ReduceSum ReduceMax ReduceMin ReduceL2 ReduceProd").split(),
        reduce_or_squeeze,
    ),
    **dict.fromkeys(("Softmax", "LogSoftmax", "LayerNormalization", "Slice"), normalize),
    "Gemm": gemm,
    "MatMul": matmul,
    "Transpose": transpose,
    "Concat": concat,
    "Split": split,
}
