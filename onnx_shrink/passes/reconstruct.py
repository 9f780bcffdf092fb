"""Layer-wise least-squares refit of pruned weights from the Gram matrix of the layer's input.

A linear layer computes ``y_j = X w_j`` for every output j (X: calibration rows of the input,
w_j: the weights of output j over the K inputs). Pruning keeps only the inputs in S_j; the
refit picks the kept weights that best reproduce the *original* output on the calibration
data:

    min_v ||X w_j - X_S v||^2   =>   (G_SS + lambda I) v = G_S: w_j,   G = X^T X

so only G (a ``StatRequest(input, "gram")``) is needed, never the rows themselves.
``lambda = ridge * mean(diag G)`` keeps the system solvable when inputs are dead or
collinear (the 1% dampening SparseGPT uses).

Rows keeping inputs of their own (unstructured and N:M masks) each need their own system:
a cube of the kept count per row, solved directly. Where that costs more than
``ITERATIVE_BREAK_EVEN`` ``[rows, K] x [K, K]`` products, the rows are solved all at once by
preconditioned conjugate gradients in matrix form (``_solve_iteratively``), two such products
an iteration. The preconditioner is ``(G + lambda I)^-1`` restricted to each row's inputs:
against the diagonal (Jacobi) it cut MiniLM's refits from 180-630 iterations to 60-130.
Started from the pruned weights, each iteration lowers every row's least-squares objective;
they run until the residual is ``ITERATIVE_TOLERANCE`` of the right-hand side, where the
output error is the direct solves' to 5-6 digits. MiniLM's 1536 -> 384 layer: 5.2 s against
6.7 s; a 4096 -> 1024 layer at 50 %: about a minute against an hour.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 0.01
MIN_RIDGE = 1e-10
_BATCH_BYTES = 1 << 28  # at most 256 MiB of stacked G_SS matrices per solve (or CG's arrays)
# Direct solves' cubes against CG's products: a batched solve does about 3.4 multiply-adds'
# work per cube (MiniLM, this machine), and a refit takes up to ~130 iterations of 2 products.
ITERATIVE_BREAK_EVEN = 90.0
ITERATIVE_TOLERANCE = 1e-6
ITERATIVE_MAX_ITERATIONS = 1000
EXPECTED_ITERATIONS = 130  # what a refit's time estimate counts


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
    return refit_measured(rows, keep, gram, ridge).rows


@dataclasses.dataclass(frozen=True)
class Refitted:
    """A refit and what it does to the layer's output on the calibration rows."""

    rows: np.ndarray
    energy: float  # tr(W G W^T), ``output_energy``
    error: float  # ``output_error`` of ``rows``
    pruned_error: float  # ``output_error`` of the pruned weights unrefit, for comparison
    complete: bool = True  # False: conjugate gradients stopped at ``iterations``, unconverged


def refit_measured(
    rows: np.ndarray,
    keep: np.ndarray,
    gram: np.ndarray,
    ridge: float = DEFAULT_RIDGE,
    iterations: int | None = None,
) -> Refitted:
    """``refit``, with the output energy and the refit rows' relative output error read off
    the solve instead of two more ``[rows, K] x [K, K]`` products: with T = W G and each
    refit row v solving ``(G_SS + damp I) v_S = t_S`` (up to the residual r_S a conjugate-
    gradient solve leaves), ``||X(w - v)||^2 = w.t - v.t - damp |v|^2 - v.r``.

    ``iterations``: at most this many conjugate-gradient iterations (a time budget's share);
    rows they leave unconverged keep where the iterations took them, which lowered their
    error every step (the identity above holds for any v). None: until converged."""
    rows = np.asarray(rows, np.float64)
    gram = np.asarray(gram, np.float64)
    if gram.shape != (rows.shape[1], rows.shape[1]) or keep.shape != rows.shape:
        raise ValueError(f"shapes do not fit: rows {rows.shape}, keep {keep.shape}, {gram.shape}")
    scale = float(np.mean(np.diag(gram))) if gram.size else 0.0
    # ridge 0 still damps a little, relative to G: an absolute floor is nothing against a
    # rank-deficient Gram of large scale, whose inverse conjugate gradients then cannot use.
    damp = max(ridge, MIN_RIDGE) * scale if scale > 0 else 1e-8
    target = rows @ gram  # row j: G_{:,:} w_j, restricted to S_j below
    result = np.zeros_like(rows)
    leftover, complete = _solve_all(rows, keep, gram, target, damp, result, iterations)
    energy = float(np.sum(rows * target))
    error = energy - float(np.sum(result * target)) - damp * float(np.sum(result**2)) - leftover
    relative = max(error, 0.0) / energy if energy > 0 else 0.0
    pruned = output_error(rows, np.where(keep, rows, 0.0), gram, energy)
    return Refitted(result, energy, relative, pruned, complete)


def _solve_all(rows, keep, gram, target, damp, result, iterations=None) -> tuple[float, bool]:
    """Fill ``result`` with every row's solution; returns (Σ v.r over the rows solved by
    conjugate gradients: their residual's share of the error identity, whether every row
    converged)."""
    shared, alone = _rows_by_pattern(keep)
    for members in shared:
        _solve_shared(members, keep, gram, target, damp, result)
    counts = keep[alone].sum(axis=1) if alone else np.zeros(0, int)
    if _iterative_pays(counts, rows.shape[1]):
        inverse = np.linalg.inv(gram + damp * np.eye(len(gram)))
        chunk = max(1, _BATCH_BYTES // (7 * 8 * rows.shape[1]))  # CG's [rows, K] arrays
        leftover, complete = 0.0, True
        for start in range(0, len(alone), chunk):
            members = alone[start : start + chunk]
            part, done = _solve_iteratively(
                members, rows, keep, gram, inverse, target, damp, result, iterations
            )
            leftover, complete = leftover + part, complete and done
        return leftover, complete
    _solve_directly(alone, keep, gram, target, damp, result)
    return 0.0, True


def _solve_directly(members, keep, gram, target, damp, result) -> None:
    """Each of rows ``members`` by a direct solve of its own system, rows of equal kept
    counts batched."""
    by_count: dict[int, list[int]] = defaultdict(list)
    for j in members:
        by_count[int(keep[j].sum())].append(j)
    for count, rows in by_count.items():
        chunk = max(1, _BATCH_BYTES // (8 * count * count))
        for start in range(0, len(rows), chunk):
            _solve_rows(rows[start : start + chunk], keep, gram, target, damp, result)


@dataclasses.dataclass(frozen=True)
class SolveCosts:
    """A refit's work, about: ``cubes`` of the kept counts of the systems solved directly (one
    per kept-input pattern rows share, one per row keeping inputs of its own unless those go
    to conjugate gradients), and the multiply-adds of conjugate gradients: ``fixed`` (the
    preconditioner's inverse) and ``per_iteration`` (two ``rows x K^2`` products)."""

    cubes: float
    fixed: float = 0.0
    per_iteration: float = 0.0

    def products(self, iterations: int = EXPECTED_ITERATIONS) -> float:
        return self.fixed + iterations * self.per_iteration


def solve_costs(keep: np.ndarray) -> SolveCosts:
    """The work of refitting mask ``keep``."""
    shared, alone = _rows_by_pattern(keep)
    cubes = float(sum(float(keep[members[0]].sum()) ** 3 for members in shared))
    counts = keep[alone].sum(axis=1).astype(np.float64) if alone else np.zeros(0)
    return _costs(cubes, counts, keep.shape[1])


def uniform_costs(rows: int, k: int, kept: int) -> SolveCosts:
    """The work of refitting ``rows`` rows of ``k`` inputs that each keep ``kept`` inputs of
    their own (unstructured and N:M masks), before the mask is known."""
    return _costs(0.0, np.full(rows, float(kept)), k)


def _costs(cubes: float, counts: np.ndarray, k: int) -> SolveCosts:
    if _iterative_pays(counts, k):
        return SolveCosts(cubes, float(k) ** 3, 2 * len(counts) * float(k) ** 2)
    return SolveCosts(cubes + float(np.sum(counts**3)))


def _iterative_pays(counts: np.ndarray, k: int) -> bool:
    """Do direct solves of these kept counts cost more than conjugate gradients?"""
    cubes = float(np.sum(np.asarray(counts, np.float64) ** 3))
    return len(counts) > 0 and cubes > ITERATIVE_BREAK_EVEN * len(counts) * float(k) ** 2


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


def _solve_iteratively(
    members, rows, keep, gram, inverse, target, damp, result, iterations=None
) -> tuple[float, bool]:
    """Solve ``(G_SS + damp I) v = (G w)_S`` for each of rows ``members`` (each its own S) by
    preconditioned conjugate gradients, all rows in step: ``V (G + damp I)`` masked to each
    row's S is the operator, ``R inverse`` masked the preconditioner (``inverse``:
    ``(G + damp I)^-1``). A row stops moving once its residual is within
    ``ITERATIVE_TOLERANCE`` of its right-hand side; past ``iterations`` (a budget) every row
    stops, where it is. Returns (Σ v.r: the solutions against the residual they leave,
    whether every row converged)."""
    mask = keep[members].astype(np.float64)
    rhs = target[members] * mask
    x = rows[members] * mask  # the pruned weights: the refit only improves on them

    def operator(v: np.ndarray) -> np.ndarray:
        product = v @ gram
        product += damp * v
        product *= mask
        return product

    def preconditioned(r: np.ndarray) -> np.ndarray:
        product = r @ inverse
        product *= mask
        return product

    residual = rhs - operator(x)
    rhs_norms = np.linalg.norm(rhs, axis=1)
    limit = ITERATIVE_TOLERANCE * rhs_norms
    budgeted = iterations is not None and iterations < ITERATIVE_MAX_ITERATIONS
    most = iterations if budgeted else ITERATIVE_MAX_ITERATIONS
    iteration = _iterate(x, residual, limit, operator, preconditioned, most)
    norms = np.linalg.norm(residual, axis=1)
    logger.debug(
        "refit: %d rows of %d inputs: %d conjugate-gradient iterations, residual %.1e",
        len(members),
        rows.shape[1],
        iteration,
        float(np.max(norms / np.maximum(rhs_norms, 1e-300), initial=0.0)),
    )
    result[members] = x
    stalled = np.flatnonzero(norms > limit)
    if stalled.size and budgeted:  # the budget's share is spent: they stay where they are
        return float(np.sum(x * residual)), False
    if stalled.size:  # ill-conditioned past what the iterations reach: solved directly
        logger.debug("refit: %d rows did not converge; solved directly", stalled.size)
        residual[stalled] = 0.0
        _solve_directly([members[i] for i in stalled], keep, gram, target, damp, result)
    return float(np.sum(x * residual)), True


def _iterate(x, residual, limit, operator, preconditioned, most: int) -> int:
    """Preconditioned conjugate gradients on every row at once, ``x`` and ``residual``
    updated in place, until each row's residual norm is within ``limit`` (a row that is
    stops moving) or ``most`` iterations; returns the iterations run."""
    z = preconditioned(residual)
    direction = z.copy()
    rz = np.einsum("ij,ij->i", residual, z)
    iteration = 0
    for iteration in range(most):  # noqa: B007 - returned
        active = np.linalg.norm(residual, axis=1) > limit
        if not active.any():
            break
        applied = operator(direction)
        curvature = np.einsum("ij,ij->i", direction, applied)
        alpha = np.where(active & (curvature > 0), rz / np.where(curvature > 0, curvature, 1), 0)
        x += alpha[:, None] * direction
        residual -= alpha[:, None] * applied
        z = preconditioned(residual)
        rz_next = np.einsum("ij,ij->i", residual, z)
        beta = np.where(rz > 0, rz_next / np.where(rz > 0, rz, 1), 0)
        direction *= beta[:, None]
        direction += z
        rz = rz_next
    return iteration


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
