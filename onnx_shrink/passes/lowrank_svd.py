"""The SVD math of ``lowrank``: (whitened) truncated SVD, its factors, the refit, the whitener.

See ``lowrank``'s module docstring for the identities; nothing here knows a graph.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from onnx_shrink.passes import lowrank_ranks as ranks_mod


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The SVD of S·W (S = I without data) and the whitener S to undo."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    whitener: np.ndarray | None

    def tail_energy(self) -> np.ndarray:
        """``tail[r]`` = Σ_{i>=r} σ_i², the squared error of rank r, for r = 0..len(s)."""
        return ranks_mod.tail_energy(self.s)

    @functools.cached_property
    def left(self) -> np.ndarray:
        """S⁻¹U (U without data), solved once for every rank's A."""
        return self.u if self.whitener is None else np.linalg.solve(self.whitener, self.u)


def factorize(weight: np.ndarray, whitener: np.ndarray | None = None) -> Factorization:
    """SVD of ``whitener @ weight`` (an upper-triangular or diagonal S), or of ``weight``."""
    target = weight if whitener is None else whitener @ weight
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    return Factorization(u, s, vt, whitener)


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
    scale = float(np.trace(gram)) / len(gram) if len(gram) else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return None
    identity = np.eye(len(gram))
    for attempt in range(6):
        try:
            lower = np.linalg.cholesky(gram + damping * 10.0**attempt * scale * identity)
        except np.linalg.LinAlgError:
            continue
        return lower.T
    return None
