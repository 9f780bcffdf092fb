"""Dead zones: values below a level that every reader of a tensor maps to the same result.

A hard-swish ``x * Clip(x + 3, 0, 6)`` (MobileNetV3, PP-OCR; ``HardSwish`` or decomposed) is 0
for every ``x <= -3``: how far below -3 a value lies changes nothing downstream. Quantizing
``x`` over its measured range wastes the grid on that tail: on PP-OCRv4 rec a Conv output
ranging over [-17.6, 10.1] feeds a hard-swish, and all of [-17.6, -3] is one output value.
Quantized over [-3, 10.1] instead, its step is half as wide, at no cost at all: a value
below -3 saturates to -3, which the hard-swish maps to 0 as it did the value itself.

``floors`` finds, for a tensor, the level below which *every* reader is flat:

* ``Relu`` (0), ``Clip`` with a constant min (that min), ``HardSwish`` (-3),
  ``HardSigmoid`` (``-beta / alpha``);
* ``Add``/``Sub`` of a constant scalar: the output's floor moved back by it;
* ``Mul`` by a factor that is 0 below a level of the same tensor (the ``Clip(x + 3, 0, 6)``
  of a decomposed hard-swish): the product is 0 there whatever the tensor's value;
* ops that only move values (``placement.SHAPE_ONLY``, ``Split``) or keep a maximum
  (``MaxPool``): their output's floor.

The floor of a tensor is the lowest of its readers' (below it, all are flat); a graph output
or any other reader has none. ``collapse`` moves the statistics' mass below the floor onto it
(the calibration method then chooses the range of what matters), and ``aligned`` puts a grid
point exactly on the floor, so that a saturated value dequantizes to the floor itself and the
reader's flat region holds it, whatever the rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.statistics import Histogram, MinMax
from onnx_shrink.passes.quant import placement
from onnx_shrink.passes.quant.numerics import QuantType

TRANSPARENT = placement.SHAPE_ONLY | {"Split", "MaxPool"}
"""Ops whose output values are input values (or a maximum of them): a value below the
output's floor either is moved there or loses to a larger one."""


def floors(graph: ir.Graph, tensors: Collection[str]) -> dict[str, float]:
    """For each of ``tensors`` whose every reader is flat below a level, that level."""
    values = {v.name: v for node in graph for v in node.outputs if v is not None}
    values.update((v.name, v) for v in graph.inputs)
    result = {}
    for name in tensors:
        value = values.get(name)
        floor = _floor(value, depth=0) if value is not None else None
        if floor is not None and np.isfinite(floor):
            result[name] = floor
    return result


_MAX_DEPTH = 8


def _floor(value: ir.Value, depth: int) -> float | None:
    """The level below which every reader of ``value`` gives the same result, or None."""
    if value.is_graph_output() or depth > _MAX_DEPTH:
        return None
    uses = list(value.uses())
    if not uses:
        return None
    levels = [_reader_floor(use.node, use.idx, value, depth) for use in uses]
    return None if any(level is None for level in levels) else min(levels)


def _reader_floor(node: ir.Node, index: int, value: ir.Value, depth: int) -> float | None:
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    out = node.outputs[0] if node.outputs else None
    if op == "Relu":
        return 0.0
    if op == "Clip" and index == 0:
        return _clip_min(node)
    if op == "HardSwish":
        return -3.0
    if op == "HardSigmoid":
        alpha = _attribute(node, "alpha", 0.2)
        return -_attribute(node, "beta", 0.5) / alpha if alpha > 0 else None
    if op in ("Add", "Sub") and out is not None:
        constant = _scalar(node.inputs[1 - index]) if len(node.inputs) == 2 else None
        if constant is None or (op == "Sub" and index == 1):
            return None
        floor = _floor(out, depth + 1)
        if floor is None:
            return None
        return floor - constant if op == "Add" else floor + constant
    if op == "Mul" and len(node.inputs) == 2:
        return _zero_below(node.inputs[1 - index], value)
    if op in TRANSPARENT and index == 0:
        floors_out = [_floor(o, depth + 1) for o in node.outputs if o is not None]
        return None if not floors_out or None in floors_out else min(floors_out)
    return None


def _zero_below(factor: ir.Value | None, value: ir.Value) -> float | None:
    """The level of ``value`` below which ``factor`` is 0: ``factor`` a Relu or a Clip with
    min 0 of ``value`` plus (or minus) a constant scalar."""
    clip = factor.producer() if factor is not None else None
    if clip is None or clip.op_type not in ("Relu", "Clip"):
        return None
    if clip.op_type == "Clip" and _clip_min(clip) != 0.0:
        return None
    shifted = clip.inputs[0]
    if shifted is value:
        return 0.0
    add = shifted.producer() if shifted is not None else None
    if add is None or add.op_type not in ("Add", "Sub") or len(add.inputs) != 2:
        return None
    if add.inputs[0] is value:
        constant = _scalar(add.inputs[1])
    elif add.inputs[1] is value and add.op_type == "Add":
        constant = _scalar(add.inputs[0])
    else:
        return None
    if constant is None:
        return None
    return -constant if add.op_type == "Add" else constant


def _clip_min(node: ir.Node) -> float | None:
    if len(node.inputs) > 1:  # opset 11 and later: an optional input
        return _scalar(node.inputs[1]) if node.inputs[1] is not None else None
    attribute = node.attributes.get("min")  # before opset 11
    return float(attribute.value) if attribute is not None else None


def _attribute(node: ir.Node, name: str, default: float) -> float:
    attribute = node.attributes.get(name)
    return float(attribute.value) if attribute is not None else default


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def collapse(
    floor: float, minmax: MinMax, histogram: Histogram | None
) -> tuple[MinMax, Histogram | None]:
    """The statistics with every value below ``floor`` moved onto it (unchanged when none
    lies below it, or when all do)."""
    if not minmax.minimum < floor < minmax.maximum:
        return minmax, histogram
    moved = dataclasses.replace(minmax, minimum=floor)
    if histogram is None:
        return moved, None
    edges = np.asarray(histogram.edges, dtype=np.float64)
    counts = np.asarray(histogram.counts, dtype=np.float64)
    first = int(np.clip(np.searchsorted(edges, floor, side="right") - 1, 0, counts.size - 1))
    kept_edges = np.concatenate(([floor], edges[first + 1 :]))
    kept_counts = counts[first:].copy()
    kept_counts[0] += counts[:first].sum()
    return moved, dataclasses.replace(histogram, edges=kept_edges, counts=kept_counts)


def aligned(floor: float, hi: float, qtype: QuantType) -> tuple[float, float]:
    """[lo, hi'] for a tensor flat below ``floor`` (< 0) whose top is ``hi``, on a grid of
    ``qtype.levels`` steps with 0 on it: the floor a whole number ``k`` of steps below 0 (a
    saturated value dequantizes to the floor exactly), ``k`` the largest that still reaches
    ``hi`` (hi' >= hi, the step at most 1 / k wider than [floor, hi]'s). A floor less than
    one such step below 0 gets one step below 0, at the top's step."""
    levels = qtype.levels
    top = max(hi, 0.0)
    below = int(np.floor(-floor / ((top - floor) / levels) + 1e-9))
    if below < 1:
        step = top / (levels - 1)
        return -step, top
    step = -floor / min(below, levels)
    return floor, (levels - min(below, levels)) * step
