"""Layer-wise least-squares refit of pruned weights from the Gram matrix of the layer's input.

A linear layer computes ``y_j = X w_j`` for every output j (X: calibration rows of the input,
w_j: the weights of output j over the K inputs). Pruning keeps only the inputs in S_j; the
refit picks the kept weights that best reproduce the *original* output on the calibration
data:

    min_v ||X w_j - X_S v||^2   =>   (G_SS + lambda I) v = G_S: w_j,   G = X^T X

so only G (a ``StatRequest(input, "gram")``) is needed, never the rows themselves.
``lambda = ridge * mean(diag G)`` keeps the system solvable when inputs are dead or
collinear (the 1% dampening SparseGPT uses).

The API works on *rows*: ``rows[j]`` holds output j's weights over the K inputs, in the
order of G's axes (``W.T`` for a MatMul weight ``W [K, N]``; a Gemm weight with
``transB=1`` as it is). ``keep`` is a same-shaped boolean mask. Structured (channel) pruning
is the case where every row keeps the same S, solved as one system with a right-hand
side per row.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

DEFAULT_RIDGE = 0.01
_BATCH_BYTES = 1 << 28  # at most 256 MiB of stacked G_SS matrices per solve


def refit(
    rows: np.ndarray, keep: np.ndarray, gram: np.ndarray, ridge: float = DEFAULT_RIDGE
) -> np.ndarray:
    """Rows with the kept weights refit by least squares and the others zero (float64).

    Args:
        rows: original weights, ``[outputs, K]``.
        keep: which weights survive pruning, ``[outputs, K]`` bool.
        gram: ``X^T X`` of the layer's input over calibration rows, ``[K, K]``.
        ridge: dampening relative to the mean diagonal of ``gram``.
    """
    rows = np.asarray(rows, np.float64)
    gram = np.asarray(gram, np.float64)
    if gram.shape != (rows.shape[1], rows.shape[1]) or keep.shape != rows.shape:
        raise ValueError(f"shapes do not fit: rows {rows.shape}, keep {keep.shape}, {gram.shape}")
    damp = ridge * float(np.mean(np.diag(gram))) if gram.size else 0.0
    damp = damp if damp > 0 else 1e-8
    target = rows @ gram  # row j: G_{:,:} w_j, restricted to S_j below
    result = np.zeros_like(rows)
    shared, alone = _rows_by_pattern(keep)
    for members in shared:
        _solve_shared(members, keep, gram, target, damp, result)
    by_count: dict[int, list[int]] = defaultdict(list)
    for j in alone:
        by_count[int(keep[j].sum())].append(j)
    for count, members in by_count.items():
        chunk = max(1, _BATCH_BYTES // (8 * count * count))
        for start in range(0, len(members), chunk):
            _solve_rows(members[start : start + chunk], keep, gram, target, damp, result)
    return result


def solve_units(keep: np.ndarray) -> float:
    """The refit's cost in cubed system sizes: one system per kept-input pattern (``refit``
    shares a pattern's), ``s^3`` each. Unstructured masks give every row its own: a 4096 x
    1024 layer at 50% is a thousand systems of 2048 unknowns, about an hour."""
    shared, alone = _rows_by_pattern(keep)
    sizes = [keep[members[0]].sum() for members in shared] + [keep[j].sum() for j in alone]
    return float(np.sum(np.asarray(sizes, np.float64) ** 3))


class RefitClock:
    """Seconds the refits of one pass have taken and will take: a rate per ``solve_units``
    from a small timed solve at first, from the refits done since."""

    PROBE_SIZE = 256

    def __init__(self) -> None:
        self.seconds = 0.0
        self.units = 0.0
        rng = np.random.default_rng(0)
        a = rng.standard_normal((self.PROBE_SIZE, self.PROBE_SIZE))
        system = a @ a.T + np.eye(self.PROBE_SIZE)
        started = time.perf_counter()
        np.linalg.solve(system[None].repeat(4, axis=0), np.ones((4, self.PROBE_SIZE, 1)))
        self._probe_rate = (time.perf_counter() - started) / (4 * self.PROBE_SIZE**3)

    def projected(self, units: float) -> float:
        rate = self.seconds / self.units if self.units else self._probe_rate
        return units * rate

    def add(self, units: float, seconds: float) -> None:
        self.units += units
        self.seconds += seconds


def _rows_by_pattern(keep: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """Rows that keep anything, as (groups of two or more rows keeping the same inputs, rows
    keeping inputs no other row keeps). A group shares one system: channel pruning gives a
    layer one group, where a system per row cost YOLOv8n's refit 100 s instead of 1."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    packed = np.packbits(keep, axis=1)
    for j in np.flatnonzero(keep.any(axis=1)):
        groups[packed[j].tobytes()].append(int(j))
    shared = [members for members in groups.values() if len(members) > 1]
    alone = [members[0] for members in groups.values() if len(members) == 1]
    return shared, alone


def _solve_shared(members, keep, gram, target, damp, result) -> None:
    """Solve ``(G_SS + damp I) V = (G W)_S`` once for rows that all keep the same inputs S."""
    index = np.flatnonzero(keep[members[0]])
    system = gram[np.ix_(index, index)]
    system[np.arange(index.size), np.arange(index.size)] += damp
    rhs = target[np.ix_(members, index)].T  # [s, rows]
    result[np.ix_(members, index)] = np.linalg.solve(system, rhs).T


def _solve_rows(members, keep, gram, target, damp, result) -> None:
    """Solve ``(G_SS + damp I) v = (G w)_S`` for rows that all keep the same number of inputs."""
    index = np.stack([np.flatnonzero(keep[j]) for j in members])  # [b, s]
    systems = gram[index[:, :, None], index[:, None, :]]  # [b, s, s]
    systems[:, np.arange(index.shape[1]), np.arange(index.shape[1])] += damp
    rhs = np.take_along_axis(target[members], index, axis=1)[..., None]
    solved = np.linalg.solve(systems, rhs)[..., 0]
    rows_of = np.asarray(members)[:, None]
    result[rows_of, index] = solved


def output_error(
    original: np.ndarray,
    candidate: np.ndarray,
    gram: np.ndarray,
    energy: float | None = None,
) -> float:
    """Relative output error on the calibration rows, from G alone:
    ``||X (W - W')||^2 / ||X W||^2 = tr(D G D^T) / tr(W G W^T)`` with rows as above.
    ``energy``: the denominator, where the caller has it (``output_energy``)."""
    original = np.asarray(original, np.float64)
    delta = np.asarray(candidate, np.float64) - original
    if energy is None:
        energy = output_energy(original, gram)
    # D G D^T reads G only where D has a nonzero column: removed channels are a few of them.
    columns = np.flatnonzero(np.any(delta != 0, axis=0))
    if columns.size < delta.shape[1]:
        delta, gram = delta[:, columns], gram[np.ix_(columns, columns)]
    error = float(np.sum((delta @ gram) * delta))
    return error / energy if energy > 0 else 0.0


def output_energy(original: np.ndarray, gram: np.ndarray) -> float:
    """``tr(W G W^T)``: the calibration rows' output energy, ``output_error``'s denominator."""
    # (A @ G) * A summed: one matrix product (a three-operand einsum loops in C without BLAS,
    # 10 s of YOLOv8n's prune-channels).
    original = np.asarray(original, np.float64)
    return float(np.sum((original @ gram) * original))
