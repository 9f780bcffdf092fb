"""Constant scales and offsets next to a Conv become part of its weights (``fold``'s helper)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.fold_reshape import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
FOLDABLE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


@dataclasses.dataclass(frozen=True)
class ConvAffinePass(ir.passes.InPlacePass):
    """Fold an elementwise scale or offset by a constant into the Conv next to it.

    PaddlePaddle's learnable affine blocks, exported BatchNorm remnants and input normalisation
    put ``Mul``/``Add`` by a constant around convolutions (PP-OCRv4 det: 329 -> 217 nodes).
    onnxruntime fuses the one after a Conv at load time on a float model, but once a quantizer
    has put a Q/DQ pair between them each one runs in float on a full activation.

    Rules, with ``c`` a finite constant of the Conv's float dtype, broadcast as one value per
    channel (``()``, ``(1,)``, ``(C, 1, 1)``, ``(1, C, 1, 1)``; never one that changes the
    other operand's shape):

    1. After: ``Conv(x, W, B) * c`` is ``Conv(x, W*c, B*c)``; ``/ c`` scales by ``1/c``;
       ``+ c`` is ``Conv(x, W, B + c)``; ``- c`` adds ``-c``. ``c`` is per output channel,
       and the Conv's output has no other use.
    2. Before: ``Conv(x * a, W)`` is ``Conv(x, W * a[ic])`` for any padding (a padded zero
       scaled is still zero); ``Conv(x + b, W, B)`` is ``Conv(x, W, B + sum(W * b[ic]))``
       only without padding (a padded border reads 0 where the original read ``b``); before
       a padded Conv a chain ``x * s + o`` of two steps or more becomes one ``Add(x, o / s)``
       and the scale goes in (``s`` without zeros). ``ic`` is the input channel each weight
       reads, group by group. A chain of steps, each result
       read only by the next (``x / 6 * w + b``), is composed into one scale and one offset
       first. Every use of the chain's result must be a Conv's data input that can absorb it,
       and each gets its own weights.
    3. Weights and biases are initializers only this Conv uses, so nothing shared changes and
       nothing is copied. A missing bias is created only with ``allow_bias_growth`` (it
       costs ``C`` values; ``fold`` refuses growth on its second attempt).
    4. Convolutions only (not ConvTranspose or ConvInteger), each in the same graph as the
       steps it takes (not across an If/Loop body); ``c`` with a NaN or an infinity, a
       division by zero, or folded weights that overflow the Conv's float type stay as they
       are. Weights and biases that are graph inputs or outputs are never changed. The 0.5
       that ends an erf GELU stays where it is: onnxruntime fuses the GELU only whole.
    5. Lossless up to float rounding: ``x / c`` becomes ``x * (1 / c)`` and the weights are
       rounded once to their type (computed in float64).
    """

    allow_bias_growth: bool = True
    """create a zero bias to absorb an offset into a Conv that has none"""

    only: frozenset[ir.Node] | None = None
    """fold only these steps (with the chains they end or the Convs they follow); None:
    every step of the model. A caller that wrote some steps itself folds those without
    touching the rest of a model it was not asked to fold (quant's hard activations). A
    chain ending at one of them takes in the steps before it, the model's own too; the Add
    this pass writes where an offset stays before a padded Conv is not in ``only``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = graph_edit.value_names(model.graph)
        count = 0
        for graph in model.graphs():
            changed = True
            while changed:  # a fold can put a Conv next to another step
                changed = False
                for node in list(graph):
                    if node.graph is not graph:  # removed earlier in this sweep
                        continue
                    if self.only is not None and node not in self.only:
                        continue
                    if _try_fold_after(node, self.allow_bias_growth, names) or _try_fold_before(
                        node, self.allow_bias_growth, names
                    ):
                        count += 1
                        changed = True
        logger.debug("fold: %d constant scales/offsets folded into convolutions", count)
        return ir.passes.PassResult(model, count > 0)


@dataclasses.dataclass(frozen=True)
class _Affine:
    """``node`` computes ``x * scale + offset`` elementwise, with one of them the identity."""

    node: ir.Node
    data: ir.Value
    constant: np.ndarray
    """the constant operand as given (Div and Sub are turned into scale and offset below)"""

    @property
    def scales(self) -> bool:
        """A scale (Mul, Div), not an offset (Add, Sub)."""
        return self.node.op_type in ("Mul", "Div")

    def per_channel(self, channels: int) -> np.ndarray:
        """The constant as ``channels`` float64 scales or offsets (already checked to fit)."""
        values = np.broadcast_to(self.constant.reshape(-1).astype(np.float64), (channels,))
        if self.node.op_type == "Div":
            return 1.0 / values
        if self.node.op_type == "Sub":
            return -values
        return values


def _affine(node: ir.Node) -> _Affine | None:
    """``node`` as an affine step by a finite constant, or None."""
    if node.op_type not in AFFINE_OPS or node.domain not in DEFAULT_DOMAINS:
        return None
    if len(node.inputs) != 2 or len(node.outputs) != 1 or None in node.inputs:
        return None
    # Mul and Add commute; Sub and Div only take the constant second (c - x is not x - c).
    positions = (1, 0) if node.op_type in ("Mul", "Add") else (1,)
    for position in positions:
        tensor = ir.convenience.get_const_tensor(node.inputs[position])
        if tensor is None or node.inputs[1 - position].const_value is not None:
            continue
        if tensor.dtype not in FOLDABLE_DTYPES:
            return None
        constant = tensor.numpy()
        if not np.all(np.isfinite(constant)) or (node.op_type == "Div" and np.any(constant == 0)):
            logger.debug("fold: not folding %s: its constant has 0, inf or NaN", node.name)
            return None
        return _Affine(node, node.inputs[1 - position], constant)
    return None


def _try_fold_after(node: ir.Node, allow_bias_growth: bool, names: set[str]) -> bool:
    """Rule 1: fold ``node`` into the Conv that produces its data operand."""
    affine = _affine(node)
    if affine is None:
        return False
    conv = affine.data.producer()
    # A Conv of an enclosing graph is another graph's node, with its own initializers.
    if conv is None or conv.graph is not node.graph:
        return False
    if len(affine.data.uses()) != 1 or affine.data.is_graph_output():
        return False
    weights = _conv_weights(conv)  # reads the weights: only once the cheap checks pass
    if weights is None:
        return False
    weight, bias = weights
    channels = weight.shape[0]
    # The Conv's output has rank weight.ndim and `channels` channels whatever its shape says.
    if weight.dtype != affine.constant.dtype or not _fits_channels(
        affine.constant, weight.ndim, channels, None
    ):
        return _declined(node, "its constant is not one value per output channel of the Conv")
    if not affine.scales and bias is None and not allow_bias_growth:
        return _declined(node, "the Conv has no bias and fold may not grow the model")
    values = affine.per_channel(channels)
    if affine.scales:
        refit = _Refit.cast(
            conv,
            weight * values.reshape(-1, *(1,) * (weight.ndim - 1)),
            None if bias is None else bias * values,
        )
    else:
        refit = _Refit.cast(conv, None, (bias if bias is not None else 0.0) + values)
    if refit is None:
        return _declined(node, "the folded weights overflow the Conv's float type")
    refit.apply(names)
    ir.convenience.replace_nodes_and_values(
        node.graph, node, [node], [], [node.outputs[0]], [affine.data]
    )
    return True


def _try_fold_before(node: ir.Node, allow_bias_growth: bool, names: set[str]) -> bool:
    """Rule 2: fold the chain of affine steps ending at ``node`` into every Conv that reads it."""
    last = _affine(node)
    readers = _reading_convs(node) if last is not None else None
    if last is None or readers is None:
        return False
    rank, dtype, channels = (
        readers[0].rank,
        readers[0].weight.dtype,
        readers[0].in_channels,
    )
    if _completes_an_erf_gelu(last):
        return _declined(node, "it is the 0.5 of a GELU, which onnxruntime fuses only whole")
    chain = _chain_ending_at(last)
    if any(
        step.constant.dtype != dtype
        or not _fits_channels(step.constant, rank, channels, chain[0].data)
        for step in chain
    ):
        return _declined(node, "a constant is not one value per input channel of the Convs")
    scale, offset = _compose(chain, channels)
    needs_bias = bool(np.any(offset != 0))
    # A padded border reads zeros where the unfolded Conv read the offset: then the offset
    # stays, as one Add, and only the scale goes in (x * s + o == (x + o / s) * s).
    keep_offset = needs_bias and not all(_unpadded(r.conv) for r in readers)
    if keep_offset and (len(chain) < 2 or np.any(scale == 0)):
        return _declined(node, "an offset cannot go into a padded Conv")
    moved = None
    if keep_offset:
        with np.errstate(over="ignore"):  # checked just below
            moved = _offset_constant(offset / scale, rank, dtype)
        if not np.all(np.isfinite(moved)):
            return _declined(node, "the moved offset overflows the Conv's float type")
    needs_bias = needs_bias and not keep_offset
    if needs_bias and not allow_bias_growth and any(r.bias is None for r in readers):
        return _declined(node, "a Conv has no bias and fold may not grow the model")
    refits = []
    for reader in readers:
        bias = reader.bias
        if needs_bias:
            shift = reader.weight.astype(np.float64) * reader.per_weight(offset)
            base = bias if bias is not None else 0.0
            bias = base + shift.sum(axis=tuple(range(1, rank)))
        weight = None if np.all(scale == 1) else reader.weight * reader.per_weight(scale)
        refits.append(_Refit.cast(reader.conv, weight, bias))
    if any(refit is None for refit in refits):
        return _declined(node, "the folded weights overflow the Conv's float type")
    for refit in refits:
        refit.apply(names)  # type: ignore[union-attr]
    graph, steps = node.graph, [step.node for step in chain]
    assert graph is not None
    if moved is not None:
        name = graph_edit.fresh_name(f"{node.name or 'conv_input'}_offset", names)
        constant = graph_edit.add_initializer(graph, name, moved)
        add = ir.node("Add", [chain[0].data, constant], name=node.name)
        replaced = node.outputs[0].name
        ir.convenience.replace_nodes_and_values(
            graph, node, steps, [add], [node.outputs[0]], [add.outputs[0]]
        )
        # It holds (x * s + o) / s, not the value of that name: a name of its own, so that a
        # per-layer comparison (--layers) never reads it as the original tensor (PP-OCRv4 rec
        # showed relative errors of 7-32 at hard-swish offsets with output cosine 1.0). Only
        # Convs read it (``_reading_convs``), never a graph output.
        add.outputs[0].name = graph_edit.fresh_name(f"{replaced}_unscaled", names)
    else:
        ir.convenience.replace_all_uses_with(node.outputs[0], chain[0].data)
        graph.remove(steps, safe=True)
    return True


def _offset_constant(offset: np.ndarray, rank: int, dtype: np.dtype) -> np.ndarray:
    """``offset`` (one value per channel) in ``dtype``, shaped to add to a rank-``rank``
    tensor: ``(1,)`` when every channel's is the same, else ``(C, 1, ...)``."""
    uniform = bool(np.all(offset == offset[0]))
    shape = (1,) if uniform else (-1, *(1,) * (rank - 2))
    return (offset[:1] if uniform else offset).reshape(shape).astype(dtype)


def _declined(node: ir.Node, reason: str) -> bool:
    logger.debug("fold: not folding %s (%s) into a Conv: %s", node.name, node.op_type, reason)
    return False


@dataclasses.dataclass(frozen=True)
class _Refit:
    """A Conv's new weight and bias, in its float type (None: the Conv keeps its own)."""

    conv: ir.Node
    weight: np.ndarray | None
    bias: np.ndarray | None

    @classmethod
    def cast(
        cls, conv: ir.Node, weight: np.ndarray | None, bias: np.ndarray | float | None
    ) -> _Refit | None:
        """The refit in the Conv weight's dtype; None when a value overflows it to inf."""
        dtype = conv.inputs[1].const_value.dtype.numpy()  # type: ignore[union-attr]
        with np.errstate(over="ignore"):  # overflow is checked for below
            new_weight = None if weight is None else np.asarray(weight).astype(dtype)
            new_bias = None if bias is None else np.asarray(bias).astype(dtype)
        if new_weight is not None and not np.all(np.isfinite(new_weight)):
            return None
        if new_bias is not None and not np.all(np.isfinite(new_bias)):
            return None
        return cls(conv, new_weight, new_bias)

    def apply(self, names: set[str]) -> None:
        """Write the weight (and bias) into the Conv's initializers, creating a bias input
        (named apart from ``names``, the model's value names)."""
        weight = self.conv.inputs[1]
        assert weight is not None
        if self.weight is not None:
            weight.const_value = ir.tensor(self.weight, name=weight.name)
        if self.bias is None:
            return
        existing = self.conv.inputs[2] if len(self.conv.inputs) > 2 else None
        if existing is not None:
            existing.const_value = ir.tensor(self.bias, name=existing.name)
            return
        graph = self.conv.graph
        assert graph is not None
        name = graph_edit.fresh_name(f"{weight.name}_bias", names)
        value = graph_edit.add_initializer(graph, name, self.bias)
        self.conv.resize_inputs(3)
        self.conv.replace_input_with(2, value)


@dataclasses.dataclass(frozen=True)
class _ConvReader:
    """A Conv reading a value as its data input, with the weights it could take a fold into."""

    conv: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    read: np.ndarray
    """[C_out, C_in / group]: the input channel each weight reads (group g reads block g)"""

    @property
    def rank(self) -> int:
        return self.weight.ndim

    @property
    def in_channels(self) -> int:
        return self.read.shape[1] * self.conv.attributes.get_int("group", 1)

    def per_weight(self, per_channel: np.ndarray) -> np.ndarray:
        """``per_channel`` (one value per input channel) laid out like the weight."""
        return per_channel[self.read].reshape(*self.read.shape, *(1,) * (self.rank - 2))


def _reading_convs(node: ir.Node) -> list[_ConvReader] | None:
    """The Convs reading ``node``'s output, when those are all its uses, all in ``node``'s
    graph (not an If/Loop body), and each can take a fold."""
    value = node.outputs[0]
    uses = value.uses()
    if not uses or value.is_graph_output() or any(use.idx != 0 for use in uses):
        return None
    convs = [use.node for use in uses]
    if len(set(convs)) != len(convs) or any(conv.graph is not node.graph for conv in convs):
        return None
    readers = []
    for conv in convs:
        weights = _conv_weights(conv)
        if weights is None:
            return None
        weight, bias = weights
        group = conv.attributes.get_int("group", 1)
        block = np.arange(weight.shape[0]) // (weight.shape[0] // group)
        read = block[:, None] * weight.shape[1] + np.arange(weight.shape[1])
        readers.append(_ConvReader(conv, weight, bias, read))
    first = readers[0]
    signature = (first.rank, first.weight.dtype, first.in_channels)
    if any((r.rank, r.weight.dtype, r.in_channels) != signature for r in readers):
        return None
    return readers


def _completes_an_erf_gelu(first: _Affine) -> bool:
    """Is ``first`` the scale that ends ``x * (1 + erf(x / √2)) * 0.5``: a Mul or Div of the
    product of something and an ``Add`` reading an ``Erf``? onnxruntime fuses the GELU (and
    the Conv layout around it) only with that scale in place: moved into the next Conv, it
    ran as Div, Erf, Add and Mul, and PP-OCRv6 rec's fold made it 1.27x slower."""
    product = first.data.producer() if first.scales else None
    if product is None or product.op_type != "Mul" or product.domain not in DEFAULT_DOMAINS:
        return False
    for factor in product.inputs:
        add = factor.producer() if factor is not None else None
        if add is not None and add.op_type == "Add":
            producers = [v.producer() for v in add.inputs if v is not None]
            if any(n is not None and n.op_type == "Erf" for n in producers):
                return True
    return False


def _chain_ending_at(last: _Affine) -> list[_Affine]:
    """``last`` and the affine steps before it whose result only the next step reads."""
    chain = [last]
    while True:
        data = chain[0].data
        producer = data.producer()
        inside = producer is not None and producer.graph is last.node.graph
        step = _affine(producer) if inside else None  # type: ignore[arg-type]
        if step is None or len(data.uses()) != 1 or data.is_graph_output():
            return chain
        if _completes_an_erf_gelu(step):  # it stays; the steps after it may still fold
            return chain
        chain.insert(0, step)


def _compose(chain: list[_Affine], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel, in float64, with ``chain(x) == x * scale + offset``."""
    scale, offset = np.ones(channels), np.zeros(channels)
    for step in chain:
        values = step.per_channel(channels)
        if step.scales:
            scale, offset = scale * values, offset * values
        else:
            offset = offset + values
    return scale, offset


def _conv_weights(conv: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight, bias) of a Conv whose weight and bias are initializers only it reads and
    the model neither takes nor gives as an input or output."""
    if conv.op_type != "Conv" or conv.domain not in DEFAULT_DOMAINS or len(conv.inputs) < 2:
        return None
    arrays = []
    for value in conv.inputs[1:3]:
        if value is None:
            arrays.append(None)
            continue
        if not value.is_initializer() or value.const_value is None:
            return None
        if value.is_graph_input() or value.is_graph_output():  # the model shows it: keep it
            return None
        if len(value.uses()) != 1 or value.dtype not in FOLDABLE_DTYPES:
            return None
        arrays.append(value.const_value.numpy())
    weight = arrays[0]
    bias = arrays[1] if len(arrays) > 1 else None
    if weight is None or weight.ndim < 3:
        return None
    return weight, bias


def _fits_channels(constant: np.ndarray, rank: int, channels: int, data: ir.Value | None) -> bool:
    """Whether ``constant`` broadcast against ``data`` (rank ``rank``) is one value per channel
    and leaves ``data``'s shape as it is; ``data`` None: known to be rank ``rank`` with
    ``channels`` channels."""
    if constant.ndim > rank:
        return False
    padded = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(padded) if axis != 1):
        return False
    if padded[1] == 1:
        # A rank-`rank` constant of ones could still raise a lower-rank operand's rank.
        return constant.ndim <= 1 or data is None or _known_rank(data) == rank
    if padded[1] != channels:
        return False
    if data is None:
        return True
    # The operand must already have those channels, or the constant would broadcast it.
    shape = data.shape
    return shape is not None and len(shape) == rank and shape[1] == channels


def _known_rank(value: ir.Value) -> int | None:
    """The rank of ``value`` if its shape is known."""
    return len(value.shape) if value.shape is not None else None


def _unpadded(conv: ir.Node) -> bool:
    """Whether ``conv`` reads no padding (explicit pads all 0, auto_pad NOTSET or VALID)."""
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    return not any(conv.attributes.get_ints("pads", []))
