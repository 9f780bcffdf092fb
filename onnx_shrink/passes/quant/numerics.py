"""Quantization arithmetic shared by the quantization passes (numpy only, vectorized).

ONNX's linear quantization: ``q = saturate(round_half_even(x / scale) + zero_point)`` and
``x' = (q - zero_point) * scale``. A range [lo, hi] is first widened to contain 0, so that 0
is exactly representable (padding and ReLU zeros stay exact):

* asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = round(qmin - lo / scale)``
* symmetric:  ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, zero point at the middle
  (0 for signed types, 128 / 32768 for unsigned ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

# Smallest scale written: a constant-zero tensor still gets a valid (positive) scale.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**10


@dataclasses.dataclass(frozen=True)
class QuantType:
    """An integer type quantized values are stored in."""

    name: str
    qmin: int
    qmax: int
    onnx: ir.DataType
    numpy: type

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


QUANT_TYPES = {
    "u8": QuantType("u8", 0, 255, ir.DataType.UINT8, np.uint8),
    "s8": QuantType("s8", -128, 127, ir.DataType.INT8, np.int8),
    "u16": QuantType("u16", 0, 65535, ir.DataType.UINT16, np.uint16),
    "s16": QuantType("s16", -32768, 32767, ir.DataType.INT16, np.int16),
    "u4": QuantType("u4", 0, 15, ir.DataType.UINT4, np.uint8),
    "s4": QuantType("s4", -8, 7, ir.DataType.INT4, np.int8),
}


def quant_type(bits: int, *, signed: bool) -> QuantType:
    """``s<bits>`` or ``u<bits>`` of ``QUANT_TYPES``."""
    return QUANT_TYPES[f"{'s' if signed else 'u'}{bits}"]


def symmetric_zero_point(qtype: QuantType) -> int:
    """The zero point of a symmetric range: 0 for signed types, the middle for unsigned."""
    return 0 if qtype.signed else (qtype.qmax + qtype.qmin + 1) // 2


def scale_and_zero_point(
    lo: np.ndarray | float, hi: np.ndarray | float, qtype: QuantType, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) for ranges [lo, hi], elementwise."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        # [-127, 127] around the zero point (not -128), so that -x quantizes to -q exactly.
        half = (qtype.levels - 1) / 2
        scale = np.maximum(np.maximum(-lo, hi) / half, MIN_SCALE)
        zero = np.full(scale.shape, symmetric_zero_point(qtype), dtype=np.int64)
    else:
        scale = np.maximum((hi - lo) / qtype.levels, MIN_SCALE)
        zero = np.clip(np.round(qtype.qmin - lo / scale), qtype.qmin, qtype.qmax).astype(np.int64)
    return scale.astype(np.float32), zero.astype(qtype.numpy)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qtype: QuantType,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate); per-axis with ``axis``.

    In float32, as onnxruntime's QuantizeLinear divides, over one working copy: an embedding
    table is tens of millions of elements.
    """
    scale, zero_point = _broadcast(scale, x.ndim, axis), _broadcast(zero_point, x.ndim, axis)
    # asarray: numpy gives a 0-d input (a scalar constant) back as a scalar, not an array.
    q = np.asarray(np.divide(x, np.asarray(scale, np.float32), dtype=np.float32))
    np.rint(q, out=q)
    q += np.asarray(zero_point, np.float32)
    np.clip(q, qtype.qmin, qtype.qmax, out=q)
    return q.astype(qtype.numpy)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """ONNX DequantizeLinear in numpy; per-axis with ``axis``."""
    scale, zero_point = _broadcast(scale, q.ndim, axis), _broadcast(zero_point, q.ndim, axis)
    return ((q.astype(np.float64) - zero_point.astype(np.float64)) * scale).astype(np.float32)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight quantized per channel (``axis`` set) or per tensor (``axis`` None)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


def quantize_weight(
    w: np.ndarray,
    qtype: QuantType,
    *,
    axis: int | None,
    symmetric: bool = True,
    scale_floor: np.ndarray | None = None,
    scale_rounding: Callable[[np.ndarray], np.ndarray] | None = None,
) -> QuantizedWeight:
    """Quantize a weight with one range per slice along ``axis`` (None: one for all).

    Symmetric scales only: each is first raised to ``scale_floor`` (one value, or one per
    scale; another size is ignored), then ``scale_rounding`` maps them to the values that
    will be stored before the weight is quantized with them; it must not make a scale
    smaller, or the largest values would clip.
    """
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        lo, hi = np.array(w.min(initial=0.0)), np.array(w.max(initial=0.0))
    else:
        axis = axis % w.ndim
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=reduce, initial=0.0), w.max(axis=reduce, initial=0.0)
    scale, zero = scale_and_zero_point(lo, hi, qtype, symmetric)
    if symmetric and scale_floor is not None and scale_floor.size in (1, scale.size):
        bound = scale_floor.reshape(scale.shape if scale_floor.size == scale.size else ())
        scale = np.maximum(scale, bound).astype(np.float32)
    if symmetric and scale_rounding is not None:
        scale = scale_rounding(scale)
    return QuantizedWeight(quantize(w, scale, zero, qtype, axis), scale, zero, axis)


def quantize_bias(
    bias: np.ndarray, input_scale: float | np.ndarray, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``input_scale * weight_scale`` (what integer kernels accumulate).

    Returns (values, scale); the zero point is 0.
    """
    scale = np.asarray(input_scale, np.float64) * np.asarray(weight_scale, np.float64)
    scale = np.maximum(scale, MIN_SCALE)
    q = np.clip(np.rint(np.asarray(bias, np.float64) / scale), -(2**31), 2**31 - 1)
    return q.astype(np.int32), np.broadcast_to(scale, np.shape(bias)).astype(np.float32)
