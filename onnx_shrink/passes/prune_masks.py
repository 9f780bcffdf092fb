"""Pruning masks: which weights survive, from their scores. Pure numpy; ``True`` = keep."""

from __future__ import annotations

import numpy as np


def magnitude_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero exactly ``round(sparsity * size)`` lowest scores (ties: lower flat index first)."""
    flat = np.asarray(scores).ravel()
    drop = round(sparsity * flat.size)
    keep = np.ones(flat.size, dtype=bool)
    if drop <= 0:
        return keep.reshape(np.shape(scores))
    # The drop-th lowest score by selection, not a sort: a 0.6 GB encoder's layers took 24 s
    # to argsort. Everything below it goes, then its ties in flat order, as a stable sort
    # would have them.
    threshold = np.partition(flat, drop - 1)[drop - 1]
    if np.isnan(threshold):  # NaN sorts last: more drops than finite scores
        keep[np.argsort(flat, kind="stable")[:drop]] = False
        return keep.reshape(np.shape(scores))
    below = flat < threshold
    keep[below] = False
    ties = np.flatnonzero(flat == threshold)
    keep[ties[: drop - int(below.sum())]] = False
    return keep.reshape(np.shape(scores))


def row_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """``magnitude_keep`` within each row of ``scores [rows, K]`` (Wanda's comparison group)."""
    drop = round(sparsity * scores.shape[1])
    keep = np.ones(scores.shape, dtype=bool)
    order = np.argsort(scores, axis=1, kind="stable")[:, :drop]
    np.put_along_axis(keep, order, False, axis=1)
    return keep


def nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries of each row."""
    rows, width = scores.shape
    groups = scores.reshape(rows, width // m, m)
    order = np.argsort(groups, axis=2, kind="stable")[:, :, : m - n]
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, False, axis=2)
    return keep.reshape(rows, width)
