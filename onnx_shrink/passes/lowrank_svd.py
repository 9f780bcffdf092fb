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
    """The SVD U·Σ·Vᵀ of S·W (S = I without data), with S⁻¹U made when first read."""

    s: np.ndarray
    vt: np.ndarray
    aware: bool  # whitened by input statistics
    _left: Callable[[], np.ndarray] = dataclasses.field(repr=False, compare=False)

    def tail_energy(self) -> np.ndarray:
        """``tail[r]`` = Σ_{i>=r} σ_i², the squared error of rank r, for r = 0..len(s)."""
        return ranks_mod.tail_energy(self.s)

    @functools.cached_property
    def left(self) -> np.ndarray:
        """S⁻¹U (U without data), made once for every rank's A."""
        return self._left()


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
    of ``weight`` itself without a gram (or one that carries no signal)."""
    k, n = weight.shape
    if gram is None or _gram_scale(gram) is None:
        return _factorize(weight, None, aware=False)
    if min(k, n) < EIGEN_MIN_DIM or n > k:
        white = whitener(gram, damping)
        return _factorize(weight if white is None else white @ weight, white, white is not None)
    # K >= N: (SW)ᵀ(SW) = Wᵀ(G + λI)W needs no S, and S⁻¹U = W·V·Σ⁻¹ (as S·W·V = U·Σ).
    damped = gram + damping * _gram_scale(gram) * np.eye(k)
    s, v = _eigen(weight.T @ (damped @ weight))
    return Factorization(s, v.T, True, lambda: weight @ v / _nonzero(s))


def _factorize(target: np.ndarray, white: np.ndarray | None, aware: bool) -> Factorization:
    """SVD of ``target`` = S·W (S = ``white``, None for I)."""
    k, n = target.shape
    if min(k, n) < EIGEN_MIN_DIM:
        u, s, vt = np.linalg.svd(target, full_matrices=False)
    elif n <= k:
        s, v = _eigen(target.T @ target)
        u, vt = target @ v / _nonzero(s), v.T
    else:
        s, u = _eigen(target @ target.T)
        vt = (u.T @ target) / _nonzero(s)[:, None]
    if white is None:
        return Factorization(s, vt, aware, lambda: u)
    return Factorization(s, vt, aware, lambda: np.linalg.solve(white, u))


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
    return f.left[:, :rank] * root, root[:, None] * f.vt[:rank]


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
