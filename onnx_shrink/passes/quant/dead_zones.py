"""Dead zones: values past a level that every reader of a tensor maps to the same result.

A hard-swish ``x * Clip(x + 3, 0, 6)`` (MobileNetV3, PP-OCR; ``HardSwish`` or decomposed) is 0
for every ``x <= -3``: how far below -3 a value lies changes nothing downstream. Quantizing
``x`` over its measured range wastes the grid on that tail: on PP-OCRv4 rec a Conv output
ranging over [-17.6, 10.1] feeds a hard-swish, and all of [-17.6, -3] is one output value.
Quantized over [-3, 10.1] instead, its step is half as wide, at no cost at all: a value
below -3 saturates to -3, which the hard-swish maps to 0 as it did the value itself. Its
28 hard-swishes so quantized, rec's strings equal to fp32's went from 0.635/0.38/0.855 to
0.74/0.89/0.88 (calibrated on 8/32/128 lines; ``benchmarks/quant_vs_ort.py``). A
hard-sigmoid (the gate of a squeeze-and-excitation block) is flat on both sides: on the
PP-OCRv4 detector its inputs range up to [-57.5, 26.8], of which [-2.5, 2.5] matters.

``zones`` finds, for a tensor, the level below which (its *floor*) and the level above which
(its *ceiling*) *every* reader is flat:

* ``Relu`` (floor 0), ``Clip`` (its constant min and max), ``HardSwish`` (floor -3),
  ``HardSigmoid`` (``-beta / alpha`` and ``(1 - beta) / alpha``);
* ``Add``/``Sub`` of a constant scalar: the output's levels moved back by it;
* ``Mul`` by a factor that is 0 below a level of the same tensor (the ``Clip(x + 3, 0, 6)``
  of a decomposed hard-swish, or paddle2onnx's ``HardSigmoid(x)``): the product is 0 there
  whatever the tensor's value;
* ops that only move values (``placement.SHAPE_ONLY``, ``Split``) or keep a maximum
  (``MaxPool``): their output's levels.

A tensor's floor is the lowest of its readers' and its ceiling the highest (past them, all
are flat); a graph output or any other reader has none. ``collapse`` moves the statistics'
mass past the levels onto them (the calibration method then chooses the range of what
matters), and ``aligned`` puts the grid's ends on or past them with 0 on the grid, so that a
saturated value stays in the flat region whatever the rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.statistics import Histogram, MinMax
from onnx_shrink.passes.quant import placement
from onnx_shrink.passes.quant.numerics import QuantType

TRANSPARENT = placement.SHAPE_ONLY | {"Split", "MaxPool"}
"""Ops whose output values are input values (or a maximum of them): a value below the
output's floor either is moved there or loses to a larger one."""


@dataclasses.dataclass(frozen=True)
class Zone:
    """Levels past which every reader of a tensor is flat (None: not on that side)."""

    floor: float | None = None
    ceiling: float | None = None

    def shifted(self, offset: float) -> Zone:
        """The zone of ``x`` when this is the zone of ``x + offset``."""
        return Zone(
            None if self.floor is None else self.floor - offset,
            None if self.ceiling is None else self.ceiling - offset,
        )


def zones(graph: ir.Graph, tensors: Collection[str]) -> dict[str, Zone]:
    """For each of ``tensors`` whose every reader is flat past a level, its ``Zone``."""
    values = {v.name: v for node in graph for v in node.outputs if v is not None}
    values.update((v.name, v) for v in graph.inputs)
    result = {}
    for name in tensors:
        value = values.get(name)
        zone = _zone(value, depth=0) if value is not None else Zone()
        if zone.floor is not None or zone.ceiling is not None:
            result[name] = zone
    return result


_MAX_DEPTH = 8
_NONE = Zone()


def _zone(value: ir.Value, depth: int) -> Zone:
    """The levels past which every reader of ``value`` gives the same result."""
    if value.is_graph_output() or depth > _MAX_DEPTH:
        return _NONE
    return _shared([_reader_zone(use.node, use.idx, value, depth) for use in value.uses()])


def _shared(zones: list[Zone]) -> Zone:
    """Where all of ``zones`` are flat: below the lowest floor, above the highest ceiling
    (none on a side where one has none, or where there are no zones)."""
    floors = [z.floor for z in zones if z.floor is not None]
    ceilings = [z.ceiling for z in zones if z.ceiling is not None]
    return Zone(
        min(floors) if zones and len(floors) == len(zones) else None,
        max(ceilings) if zones and len(ceilings) == len(zones) else None,
    )


def _reader_zone(node: ir.Node, index: int, value: ir.Value, depth: int) -> Zone:
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    out = node.outputs[0] if node.outputs else None
    if op == "Relu":
        return Zone(0.0)
    if op == "Clip" and index == 0:
        return Zone(*_clip_bounds(node))
    if op == "HardSwish":
        return Zone(-3.0)
    if op == "HardSigmoid":
        return _hard_sigmoid_zone(node)
    if op in ("Add", "Sub") and out is not None and len(node.inputs) == 2:
        constant = _scalar(node.inputs[1 - index])
        if constant is None or (op == "Sub" and index == 1):
            return _NONE
        return _zone(out, depth + 1).shifted(constant if op == "Add" else -constant)
    if op == "Mul" and len(node.inputs) == 2:
        return Zone(_zero_below(node.inputs[1 - index], value))
    if op in TRANSPARENT and index == 0:
        return _shared([_zone(o, depth + 1) for o in node.outputs if o is not None])
    return _NONE


def _zero_below(factor: ir.Value | None, value: ir.Value) -> float | None:
    """The level of ``value`` below which ``factor`` is 0: ``factor`` a Relu, a Clip with
    min 0 or a HardSigmoid (paddle2onnx writes a hard-swish as ``HardSigmoid(x) * x``) of
    ``value`` plus (or minus) a constant scalar."""
    gate = factor.producer() if factor is not None else None
    zero_at = _gate_zero(gate) if gate is not None else None
    if zero_at is None:
        return None
    shifted = gate.inputs[0]  # type: ignore[union-attr]
    if shifted is value:
        return zero_at
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
    return zero_at - constant if add.op_type == "Add" else zero_at + constant


def _gate_zero(gate: ir.Node) -> float | None:
    """The level of its input below which ``gate`` outputs 0, if it is such a gate."""
    if gate.domain not in ("", "ai.onnx"):
        return None
    if gate.op_type == "Relu":
        return 0.0
    if gate.op_type == "Clip" and _clip_bounds(gate)[0] == 0.0:
        return 0.0
    if gate.op_type == "HardSigmoid":
        return _hard_sigmoid_zone(gate).floor
    return None


def _hard_sigmoid_zone(node: ir.Node) -> Zone:
    """Where a HardSigmoid is flat: 0 below ``-beta / alpha``, 1 above ``(1 - beta) / alpha``."""
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    return Zone(-beta / alpha, (1.0 - beta) / alpha) if alpha > 0 else _NONE


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """A Clip's constant (min, max), None where it has none."""
    if len(node.inputs) > 1 or ("min" not in node.attributes and "max" not in node.attributes):
        bounds = list(node.inputs[1:3]) + [None, None]
        return _scalar(bounds[0]), _scalar(bounds[1])
    return node.attributes.get_float("min"), node.attributes.get_float("max")  # before opset 11


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


Pick = Callable[[MinMax, "Histogram | None"], tuple[float, float]]
"""The calibration method: a range from a tensor's statistics."""


def chosen_range(
    zone: Zone, minmax: MinMax, histogram: Histogram | None, pick: Pick, qtype: QuantType
) -> tuple[float, float]:
    """The range to quantize a tensor with ``zone`` over: ``pick`` on its statistics with
    the mass past the zone's levels moved onto them (``collapse``), the ends at the levels
    where values lay past them, and the grid aligned on them (``aligned``)."""
    minmax, histogram, applied = collapse(zone, minmax, histogram)
    lo, hi = pick(minmax, histogram)
    lo = applied.floor if applied.floor is not None else lo
    hi = applied.ceiling if applied.ceiling is not None else hi
    return aligned(
        lo,
        hi,
        qtype,
        at_floor=applied.floor is not None,
        at_ceiling=applied.ceiling is not None,
    )


def collapse(
    zone: Zone, minmax: MinMax, histogram: Histogram | None
) -> tuple[MinMax, Histogram | None, Zone]:
    """The statistics with every value past the zone's levels moved onto them, and the
    levels that moved any (a level no value lies past, or past which all do, stays out)."""
    floor = zone.floor if zone.floor is not None and minmax.minimum < zone.floor else None
    ceiling = zone.ceiling
    if ceiling is not None and not ceiling < minmax.maximum:
        ceiling = None
    low = floor if floor is not None else minmax.minimum
    high = ceiling if ceiling is not None else minmax.maximum
    if not low < high:  # everything in a flat region: nothing to choose
        return minmax, histogram, Zone()
    moved = dataclasses.replace(minmax, minimum=low, maximum=high)
    applied = Zone(floor, ceiling)
    if histogram is None:
        return moved, None, applied
    edges = np.asarray(histogram.edges, dtype=np.float64)
    counts = np.asarray(histogram.counts, dtype=np.float64)
    last = counts.size - 1
    first = int(np.clip(np.searchsorted(edges, low, side="right") - 1, 0, last))
    top = int(np.clip(np.searchsorted(edges, high, side="left") - 1, first, last))
    kept_counts = counts[first : top + 1].copy()
    kept_counts[0] += counts[:first].sum()
    kept_counts[-1] += counts[top + 1 :].sum()
    kept_edges = np.concatenate(([max(low, edges[0])], edges[first + 1 : top + 1], [high]))
    kept = dataclasses.replace(histogram, edges=kept_edges, counts=kept_counts)
    return moved, kept, applied


def aligned(
    lo: float, hi: float, qtype: QuantType, *, at_floor: bool, at_ceiling: bool
) -> tuple[float, float]:
    """[lo', hi'] on a grid of ``qtype.levels`` steps with 0 on it, for a range whose ``lo``
    is a floor (``at_floor``) or whose ``hi`` is a ceiling: that end a whole number ``k`` of
    steps from 0 (a saturated value dequantizes to the level exactly), ``k`` the largest that
    still reaches the other end (the step at most 1 / k wider than [lo, hi]'s). A level less
    than one such step from 0 gets one step, at the other end's step."""
    levels = qtype.levels
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if at_floor and lo < 0:
        below = min(int(np.floor(-lo / ((hi - lo) / levels) + 1e-9)), levels)
        if below < 1:
            return -hi / (levels - 1), hi
        step = -lo / below
        return lo, (levels - below) * step
    if at_ceiling and hi > 0:  # the floor's case, mirrored
        low, high = aligned(-hi, -lo, qtype, at_floor=True, at_ceiling=False)
        return -high, -low
    return lo, hi
