"""Block-wise quantization of 2-D weights and low-bits-first packing (numpy only, vectorized).

A row ``w[r, :]`` of length L is cut into ``n_blocks = ceil(L / B)`` blocks of ``B`` values,
the last one padded with zeros. Each block ``j`` gets its own range and ONNX linear
quantization (``numerics``): ``q = saturate(round_half_even(w / s[r, j]) + z[r, j])`` and
``w' = (q - z[r, j]) * s[r, j]``, so ``|w - w'| <= s[r, j] / 2`` inside the range, with

* symmetric (signed codes, ``z = 0``), per block the better of two grids, the one leaving
  the smaller squared error (ties: the first):
  - ``s = max|w_block| / (2^(bits-1) - 1)``: codes ``[-7, 7]`` for 4 bits, 15 of the 16,
    every value within half a step;
  - ``s = e / -2^(bits-1)``, ``e`` the block's value of largest magnitude: ``e`` becomes
    code -8 exactly and all 16 codes are used, a step ``(2^(bits-1) - 1) / 2^(bits-1)``
    as wide (7/8 for 4 bits). The scale is negative where ``e`` is; a value opposite ``e``
    and near its magnitude saturates at code 7, up to one step away. onnxruntime's own
    4-bit packing (MLAS) uses this grid alone; taking it per block only where it is better
    leaves no block a larger error than the first grid's, and most a smaller one
    (MiniLM's weights in blocks of 32: 0.086 relative error, against 0.098 on the first
    grid alone).
* asymmetric: ``s = (max(w_block, 0) - min(w_block, 0)) / (2^bits - 1)``, ``z`` in [0, 2^bits).

Packing (MatMulNBits, GatherBlockQuantized): codes are stored unsigned; ``8 / bits`` codes share
a byte, the first in the lowest bits: ``byte = c0 | c1 << 4`` for 4 bits. Symmetric signed codes
become unsigned by adding ``2^(bits-1)``, which is the default zero point of those operators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from onnx_shrink.passes.quant import gptq, numerics
from onnx_shrink.passes.quant.numerics import (
    MIN_SCALE,
    QuantType,
    quantize,
    scale_and_zero_point,
)

SUPPORTED_BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """Codes of a [rows, length] weight quantized in blocks along its last axis.

    ``codes`` is [rows, n_blocks, block_size] (zero-padded past ``length``), ``scales`` and
    ``zero_points`` are [rows, n_blocks]; ``zero_points`` is all zeros for symmetric codes.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    qtype: QuantType
    length: int
    symmetric: bool

    @property
    def bits(self) -> int:
        return int(self.qtype.levels).bit_length()

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[-1])

    def values(self) -> np.ndarray:
        """Codes as [rows, length] (padding dropped), in ``qtype``'s numpy type."""
        rows = self.codes.shape[0]
        return self.codes.reshape(rows, -1)[:, : self.length]

    def unsigned_codes(self) -> np.ndarray:
        """Codes as uint8 [rows, n_blocks, block_size], shifted by 2^(bits-1) when symmetric."""
        offset = 1 << (self.bits - 1) if self.qtype.signed else 0
        return (self.codes.astype(np.int16) + offset).astype(np.uint8)

    def dequantized(self) -> np.ndarray:
        """``(q - z) * s`` as float32 [rows, length]: what a runtime computes from the codes."""
        q = self.codes.astype(np.float64) - self.zero_points[..., None].astype(np.float64)
        w = q * self.scales[..., None].astype(np.float64)
        return w.reshape(w.shape[0], -1)[:, : self.length].astype(np.float32)


def quant_type(bits: int, symmetric: bool) -> QuantType:
    """s4/s8 for symmetric codes, u4/u8 for asymmetric ones."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not one of {SUPPORTED_BITS}")
    return numerics.quant_type(bits, signed=symmetric)


CLIP_FACTORS = np.linspace(0.6, 1.0, 21)
"""the factors ``ranges=mse`` tries on each block's min/max"""


def quantize_blocks(
    w: np.ndarray, *, bits: int, block_size: int, symmetric: bool = True, mse: bool = False
) -> BlockQuantized:
    """Quantize ``w`` [rows, length] with one range per block of ``block_size`` along axis 1:
    the block's min/max (symmetric: on the better of the two grids, module doc), or with
    ``mse`` that range times the factor of ``CLIP_FACTORS`` (and grid) whose codes leave the
    least squared error in the block (clipping a few outliers buys a finer step for the
    rest)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    rows, length = w.shape
    n_blocks = -(-length // block_size)
    padded = np.zeros((rows, n_blocks * block_size), dtype=np.float32)
    padded[:, :length] = w
    blocks = padded.reshape(rows, n_blocks, block_size)
    qtype = quant_type(bits, symmetric)
    # Zero padding cannot widen a block's range: every range is widened to contain 0 anyway.
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    if symmetric or mse:
        factors = CLIP_FACTORS[::-1] if mse else (1.0,)  # widest first: a tie keeps it
        grids = _grids(lo, hi, qtype, symmetric, factors)
        scales, zero_points, codes = _least_error_grid(blocks, qtype, grids)
    else:  # one candidate: its codes directly
        scales, zero_points = scale_and_zero_point(lo, hi, qtype, symmetric)
        codes = quantize(blocks, scales[..., None], zero_points[..., None], qtype)
    return BlockQuantized(codes, scales, zero_points, qtype, length, symmetric)


def _grids(
    lo: np.ndarray, hi: np.ndarray, qtype: QuantType, symmetric: bool, factors: Iterable[float]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each block's candidate scales and zero points: for each factor, its range times the
    factor, and for symmetric codes also the full grid of that range (module doc)."""
    for factor in factors:
        yield scale_and_zero_point(lo * factor, hi * factor, qtype, symmetric)
        if symmetric:
            yield _full_symmetric_grid(lo * factor, hi * factor, qtype)


def _full_symmetric_grid(
    lo: np.ndarray, hi: np.ndarray, qtype: QuantType
) -> tuple[np.ndarray, np.ndarray]:
    """``s = e / qmin`` with ``e`` the end of ``[lo, hi]`` of larger magnitude (the lower one
    on a tie): ``e`` quantizes to ``qmin`` exactly; the zero point is 0."""
    extreme = np.where(-lo >= hi, lo, hi).astype(np.float64)
    scale = extreme / qtype.qmin
    scale = np.where(np.abs(scale) < MIN_SCALE, MIN_SCALE, scale)
    return scale.astype(np.float32), np.zeros(scale.shape, qtype.numpy)


def _least_error_grid(
    blocks: np.ndarray, qtype: QuantType, grids: Iterator[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the scale, zero point and codes among ``grids`` whose codes leave the least
    squared error (ties: the first).

    ``numerics.quantize``'s arithmetic (float32 divide, round half to even, saturate), kept
    in float32 until the winner is known: with a cast to codes and back per candidate, and
    a sum of squares over the short last axis, ``ranges=mse``'s 42 candidates took 4.6 s on
    a 30522x384 table, 2.9 s so.
    """
    best = None
    # Two working buffers, reused: fresh ones per candidate cost more in page faults than
    # the arithmetic (a first call on a 30522x384 table: 0.56 s against 0.25 s).
    codes, miss = np.empty_like(blocks), np.empty_like(blocks)
    for scales, zeros in grids:
        scale, zero = scales[..., None], zeros[..., None].astype(np.float32)
        np.divide(blocks, scale, out=codes)
        np.rint(codes, out=codes)
        codes += zero
        np.clip(codes, qtype.qmin, qtype.qmax, out=codes)
        np.subtract(codes, zero, out=miss)
        miss *= scale
        miss -= blocks
        error = np.einsum("rbk,rbk->rb", miss, miss)  # a sum over the short last axis is slow
        if best is None:
            best = [error, scales, zeros, codes]
            codes = np.empty_like(blocks)
            continue
        better = error < best[0]
        np.copyto(best[0], error, where=better)
        np.copyto(best[1], scales, where=better)
        np.copyto(best[2], zeros, where=better)
        np.copyto(best[3], codes, where=better[..., None])
    _, scales, zeros, codes = best
    return scales, zeros, codes.astype(qtype.numpy)


def quantize_blocks_gptq(
    w: np.ndarray,
    gram: np.ndarray,
    *,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    mse: bool = False,
) -> BlockQuantized:
    """``quantize_blocks``' grid (the same scales and zero points), with the codes GPTQ picks
    for inputs of Gram ``gram`` ``[length, length]`` (``gptq``) instead of the nearest ones.
    Raises ``numpy.linalg.LinAlgError`` where the Gram cannot be used."""
    nearest = quantize_blocks(w, bits=bits, block_size=block_size, symmetric=symmetric, mse=mse)
    rows, length = nearest.values().shape
    qtype = nearest.qtype
    groups = np.arange(length) // block_size
    codes = gptq.gptq_codes(
        w, gram, nearest.scales, nearest.zero_points, groups, qtype.qmin, qtype.qmax
    )
    padded = nearest.codes.reshape(rows, -1).copy()
    padded[:, :length] = codes.astype(padded.dtype)
    return dataclasses.replace(nearest, codes=padded.reshape(nearest.codes.shape))


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis into uint8, first code lowest.

    The last axis is zero-padded to a multiple of ``8 // bits``; for 4 bits
    ``out[..., i] = codes[..., 2i] | codes[..., 2i + 1] << 4``.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits).astype(np.uint16)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_low_first``: the first ``count`` codes along the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count]
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)
