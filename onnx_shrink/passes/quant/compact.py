"""Fewer bytes for the same quantized model: short generated names, constants in the
narrowest type that holds them exactly (float16 scales) behind a Cast.

A quantized model's weights shrink 4x, so the graph's own bytes become a visible share of the
file: on paraphrase-MiniLM-L3, names derived from torch's long tensor names and float32
per-channel scales were about 0.6 % of it, as much as the whole margin to onnxruntime's file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit

logger = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)
CAST_BYTES = 24
"""serialized bytes of an unnamed Cast besides its input's name: op type, ``to`` attribute,
a generated output name (read twice), field tags"""


# ---- names ---------------------------------------------------------------------------------


class Names:
    """Names of the values and nodes quantization adds.

    The values of the k-th quantized tensor are ``q<k>_scale``, ``q<k>_zero_point``,
    ``q<k>_quantized`` and ``q<k>_dequantized``, each read two to four times; its
    QuantizeLinear node carries the meaning, once: the tensor's *alias*, the shortest
    trailing run of its ``/``-separated name, less a trailing ``_output_0`` (torch's
    exporter), that no other value of the graph ends with
    (``/model/encoder/layer.0/attention/self/query/MatMul_output_0`` becomes
    ``layer.0/attention/self/query/MatMul``). Every name is checked against those in use and
    made unique with ``_1``, ``_2``...
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.taken = graph_edit.value_names(graph)
        self.nodes = {node.name for g in (graph, *graph.subgraphs()) for node in g if node.name}
        self._suffixes = Counter(
            suffix for name in self.taken for suffix in _suffixes(_segments(name))
        )
        self._count = 0

    def next_tensor(self) -> str:
        """The prefix (``q<k>``) of the next quantized tensor's values."""
        prefix = f"q{self._count}"
        self._count += 1
        return prefix

    def alias(self, tensor: str) -> str:
        """The shortest unambiguous trailing part of ``tensor``'s name (the name if none)."""
        for suffix in _suffixes(_segments(tensor)):
            if self._suffixes[suffix] == 1:
                return "/".join(suffix)
        return tensor

    def fresh(self, name: str) -> str:
        """``name``, or ``name_<i>`` with the first ``i`` not in use; reserved from now on."""
        return graph_edit.fresh_name(name, self.taken)

    def fresh_node(self, name: str) -> str:
        """A node name like ``fresh``, unique among node names."""
        return graph_edit.fresh_name(name, self.nodes)


def _segments(name: str) -> tuple[str, ...]:
    return tuple(name.removesuffix("_output_0").split("/"))


def _suffixes(segments: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """Trailing runs of ``segments``, shortest first."""
    return (segments[-i:] for i in range(1, len(segments) + 1))


# ---- narrow storage ------------------------------------------------------------------------

# Stored types tried for each type, narrowest first.
NARROWER = {
    ir.DataType.FLOAT: (ir.DataType.FLOAT16,),
    ir.DataType.INT64: (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32),
}


def float16_scale(scale: np.ndarray) -> np.ndarray:
    """``scale`` rounded *up* to float16 values (returned as float32), so that weights
    quantized with it never clip.

    Each scale grows by less than 2^-10 of itself, or by less than 2^-24 where float16 holds
    it only as a subnormal (a channel of weights below 10^-3): a weight's error bound
    ``scale / 2`` grows by as much. Unchanged when float16 cannot hold the largest.
    """
    scale = np.asarray(scale, np.float32)
    if scale.size == 0 or not np.isfinite(scale).all() or scale.max() > FLOAT16_MAX / 2:
        return scale
    half = scale.astype(np.float16)
    half = np.where(half.astype(np.float32) < scale, np.nextafter(half, np.float16(np.inf)), half)
    return half.astype(np.float32)


def scale_rounding(
    narrow_storage: bool, axis: int | None
) -> Callable[[np.ndarray], np.ndarray] | None:
    """How a weight's scales are rounded before it is quantized with them: per-channel scales
    (``axis`` set) become float16 values with ``narrow_storage``, so ``store_narrow`` can
    store them as float16 exactly; otherwise None. A per-tensor scale stays float32: the 2
    bytes float16 would save do not pay for a Cast."""
    return float16_scale if narrow_storage and axis is not None else None


def store_narrow(model: ir.Model) -> int:
    """Store the constants of every graph of ``model`` in the narrowest type that holds them
    exactly, read through a Cast back to their type; return how many.

    Rules:

    1. float32 initializers as float16 (scales made by ``float16_scale``, norm weights of
       ones, ...), int64 ones as int8, int16 or int32 (position ids, index tables), where the
       narrower type holds every value exactly: what any node reads is bit for bit what it
       read before.
    2. Not graph inputs (callers may override those) or graph outputs.
    3. Only where it saves bytes, against the Cast's.

    The narrow tensor keeps the initializer's name; the output of an unnamed Cast
    (``cast<k>``, unique in the whole model) is what every reader reads instead. onnxruntime
    folds the Cast into an initializer of the old type when it loads the model, before it
    fuses Q/DQ patterns (which need constant scales), so nothing changes at run time.
    """
    names = Names(model.graph)
    count = 0
    for graph in list(model.graphs()):
        casts: list[ir.Node] = []
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            narrow = _narrow_copy(tensor, len(value.name or "") + CAST_BYTES)
            if narrow is None:
                continue
            output = ir.Value(name=names.fresh(f"cast{count + len(casts)}"))
            value.replace_all_uses_with(output)
            value.const_value = ir.tensor(narrow, name=value.name)
            # A new type object: onnx_ir's dtype setter changes the old one in place, and
            # ir.Model.clone shares type objects, so quantizing a clone (sensitivity's check
            # of its hint) retyped the original's position ids as int8.
            value.type = ir.TensorType(value.const_value.dtype)
            casts.append(ir.node("Cast", [value], {"to": tensor.dtype}, outputs=[output], name=""))
        if casts:
            graph.insert_before(graph.node(0), casts)
        count += len(casts)
    logger.debug("quant: %d constants stored in a narrower type", count)
    return count


def _narrow_copy(tensor: ir.TensorProtocol, overhead: int) -> np.ndarray | None:
    """``tensor``'s values in the narrowest type of ``NARROWER`` that holds them exactly and
    saves more than ``overhead`` bytes, or None."""
    for dtype in NARROWER.get(tensor.dtype, ()):
        if (tensor.dtype.itemsize - dtype.itemsize) * tensor.size <= overhead:
            return None
        array = tensor.numpy()
        # A value past the narrower type's range (a mask's float32-min) becomes inf there,
        # which the round trip below rejects: the overflow is the expected answer, not news.
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = array.astype(dtype.numpy())
        if np.array_equal(narrow.astype(array.dtype), array):
            return narrow
    return None
