"""The SVD math of ``lowrank``: (whitened) truncated SVD, its factors, the refit, the whitener.

See ``lowrank``'s module docstring for the identities; nothing here knows a graph.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from onnx_shrink.passes import lowrank_ranks as ranks_mod


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The SVD U·Σ·Vᵀ of S·W (S = I without data). Only σ is kept as numbers: the leading
    columns of S⁻¹U and rows of Vᵀ are made for each rank asked (``factors``), so that a pass
    holding every layer's factorization to choose ranks holds no layer's vectors twice (the
    0.6 GB encoder's 72 layers: 3.7 GB without data)."""

    s: np.ndarray
    aware: bool  # whitened by input statistics
    left: Callable[[int], np.ndarray] = dataclasses.field(repr=False, compare=False)
    """rank -> the first ``rank`` columns of S⁻¹U (U without data)"""
    right: Callable[[int], np.ndarray] = dataclasses.field(repr=False, compare=False)
    """rank -> the first ``rank`` columns of V"""

    def tail_energy(self) -> np.ndarray:
        """``tail[r]`` = Σ_{i>=r} σ_i², the squared error of rank r, for r = 0..len(s)."""
        return ranks_mod.tail_energy(self.s)


EIGEN_MIN_DIM = 256
"""Matrices whose smaller side reaches this are factorized through the eigendecomposition of
their smaller Gram matrix (below: ``np.linalg.svd``). On the encoder's 1024x4096 layers it is
2-5x faster than an SVD (and needs no Cholesky of a 4096-wide Gram when W is 4096x1024),
exact to float rounding for every singular value above about 1e-8 of the largest: those
below are noise at that scale, and never decide a rank."""


def factorize(
    weight: np.ndarray, gram: np.ndarray | None = None, damping: float = 0.0
) -> Factorization:
    """SVD of S·``weight`` with SᵀS = ``gram`` + λ·mean(diag ``gram``)·I (``whitener``), or
    of ``weight`` itself without a gram (or one that carries no signal). Computed in float64;
    the factors keep ``weight`` as given (a float32 model's: not a float64 copy of every
    layer at once, 1.2 GB on a 0.6 GB encoder) and cast it where they use it."""
    stored, weight = weight, np.asarray(weight, np.float64)
    k, n = weight.shape
    scale = _gram_scale(gram) if gram is not None else None
    if scale is None:
        return _factorize(weight, None, aware=False, stored=stored)
    if min(k, n) < EIGEN_MIN_DIM or n > k or damping <= 0:
        # Undamped, a singular Gram fails the whitener's Cholesky: plain SVD, whatever the
        # shape (the eigendecomposition below would whiten by it).
        white = whitener(gram, damping)
        if white is None:
            return _factorize(weight, None, aware=False, stored=stored)
        return _factorize(white @ weight, white, aware=True)
    # K >= N: (SW)ᵀ(SW) = Wᵀ(G + λI)W needs no S, and S⁻¹U = W·V·Σ⁻¹ (as S·W·V = U·Σ).
    damped = gram + damping * scale * np.eye(k)
    s, v = _eigen(weight.T @ (damped @ weight))
    return Factorization(s, True, _columns_of(stored, v, s), functools.partial(_leading_columns, v))


def _factorize(
    target: np.ndarray, white: np.ndarray | None, aware: bool, stored: np.ndarray | None = None
) -> Factorization:
    """SVD of ``target`` = S·W (S = I without data; ``stored``: W as given, which the
    factors keep in place of ``target`` when that is W itself)."""
    k, n = target.shape
    kept = target if stored is None else stored
    if min(k, n) < EIGEN_MIN_DIM:
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        columns = functools.partial(_leading_columns, u)
        rows = functools.partial(_leading_columns, vt.T)
    elif n <= k:
        s, v = _eigen(target.T @ target)
        columns, rows = _columns_of(kept, v, s), functools.partial(_leading_columns, v)
    else:
        s, u = _eigen(target @ target.T)
        columns, rows = functools.partial(_leading_columns, u), _columns_of(kept.T, u, s)
    if white is None:
        return Factorization(s, aware, columns, rows)
    return Factorization(s, aware, _Unwhitened(white, columns), rows)


class _Unwhitened:
    """rank -> S⁻¹·columns(rank). S⁻¹ is computed on the first call and replaces S: a rank
    search asks for a layer's left factor many times (about 18 while probing), and a solve
    by S costs a factorization of it each time (0.10 s at K = 1024, the product 0.011 s)."""

    def __init__(self, white: np.ndarray, columns: Callable[[int], np.ndarray]) -> None:
        self._matrix = white  # S until the first call, then S⁻¹
        self._inverted = False
        self._columns = columns

    def __call__(self, rank: int) -> np.ndarray:
        if not self._inverted:
            self._matrix, self._inverted = np.linalg.inv(self._matrix), True
        return self._matrix @ self._columns(rank)


def _leading_columns(matrix: np.ndarray, rank: int) -> np.ndarray:
    return matrix[:, :rank]


def _columns_of(matrix: np.ndarray, vectors: np.ndarray, s: np.ndarray) -> Callable:
    """rank -> matrix·vectors[:, :rank]·Σ⁻¹: the other side's singular vectors (M·v = σ·u),
    in float64 whatever ``matrix`` is stored as."""
    return lambda rank: np.asarray(matrix, np.float64) @ vectors[:, :rank] / _nonzero(s[:rank])


def _eigen(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(σ, vectors) of a Gram matrix MᵀM: M's singular values, largest first, and its
    singular vectors on the Gram's side."""
    values, vectors = np.linalg.eigh(gram)
    return np.sqrt(np.clip(values[::-1], 0.0, None)), vectors[:, ::-1]


def _nonzero(s: np.ndarray) -> np.ndarray:
    """σ where it is > 0, 1 elsewhere (a zero σ's vector never enters a factor that counts)."""
    return np.where(s > 0, s, 1.0)


def factors(f: Factorization, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (K x r), B (r x N) with S·A·B the rank-``rank`` truncation of S·W, Σ split evenly."""
    root = np.sqrt(f.s[:rank])
    return f.left(rank) * root, root[:, None] * f.right(rank).T


def refit(weight: np.ndarray, a: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """B = (AᵀGA)⁻¹AᵀGW: the B that best matches x·W on the calibration inputs, given A."""
    ga = gram @ a
    b, *_ = np.linalg.lstsq(a.T @ ga, ga.T @ weight, rcond=None)
    return b


def whitener(gram: np.ndarray, damping: float) -> np.ndarray | None:
    """Upper-triangular S with SᵀS = G + λ·mean(diag G)·I, damping raised until Cholesky works;
    None when G carries no signal (a layer no calibration input reached)."""
    scale = _gram_scale(gram)
    if scale is None:
        return None
    identity = np.eye(len(gram))
    for attempt in range(6):
        try:
            lower = np.linalg.cholesky(gram + damping * 10.0**attempt * scale * identity)
        except np.linalg.LinAlgError:
            continue
        return lower.T
    return None


def _gram_scale(gram: np.ndarray) -> float | None:
    """mean(diag G), None when G carries no signal."""
    scale = float(np.trace(gram)) / len(gram) if len(gram) else 0.0
    return scale if np.isfinite(scale) and scale > 0 else None
