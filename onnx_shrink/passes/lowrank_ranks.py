"""Rank choice for ``lowrank``: per-layer thresholds and the global budget allocator.

Everything here is arithmetic on spectra and costs, with no graph in sight:

    tail[r] = Σ_{i>=r} σ_i²                 (squared error of the rank-r truncation)
    relative error of rank r = tail[r] / tail[0]

``allocate`` picks one option per layer (a rank, or dense) so that the summed cost meets a
budget at the least summed relative squared error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def tail_energy(singular_values: np.ndarray) -> np.ndarray:
    """``tail[r]`` = Σ_{i>=r} σ_i², the squared error of rank r, for r = 0..len(σ)."""
    squares = np.asarray(singular_values, dtype=np.float64) ** 2
    return np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])


def relative_error(tail: np.ndarray, rank: int | None) -> float:
    """Relative squared error tail[rank] / tail[0] (0 when dense or when tail[0] is 0)."""
    if rank is None or tail[0] <= 0:
        return 0.0
    return float(tail[min(rank, len(tail) - 1)] / tail[0])


def threshold_rank(
    tail: np.ndarray, keep: float, multiple: int, candidates: Sequence[int]
) -> int | None:
    """The smallest multiple of ``multiple`` keeping ``keep`` of tail[0], or None (dense) when
    that rank is not among ``candidates`` (the ranks that save)."""
    allowed = (1.0 - keep) * tail[0]
    rank = int(np.argmax(tail <= allowed + 1e-12 * tail[0]))
    rank = max(multiple, math.ceil(rank / multiple) * multiple)
    return rank if rank in candidates else None


def allocate(
    costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], reduction: float
) -> list[int]:
    """One option index per layer, removing ``reduction`` of the summed dense cost at the
    least summed error. Each layer's arrays list its options cheapest first, dense last.

    A Lagrangian sweep (each layer minimises error + μ·cost) finds the cheapest μ that meets
    the budget; a greedy pass then spends what is left on the best error drop per cost. When
    even the cheapest options overrun the budget, every layer gets its cheapest option.
    """
    # An error that could not be measured (NaN) is no reason to choose an option.
    errors = [np.where(np.isnan(e), np.inf, e) for e in errors]
    total = sum(float(c[-1]) for c in costs)
    # A relative hair of slack: (1 - 0.3) * 90 is 62.99999999999999, which would turn away
    # an option costing exactly 63 - 52 from a budget with 11 left.
    target = (1.0 - reduction) * total * (1.0 + 1e-12)

    def pick(mu: float) -> list[int]:
        return [int(np.argmin(e + c * (mu / total))) for e, c in zip(errors, costs, strict=True)]

    low, high = -12.0, 12.0
    if costs and _spent(costs, pick(10.0**high)) > target:
        logger.warning("lowrank: the budget cannot be met; every layer gets its smallest rank")
        return [0 for _ in costs]
    for _ in range(60):
        middle = (low + high) / 2
        fits = _spent(costs, pick(10.0**middle)) <= target
        low, high = (low, middle) if fits else (middle, high)
    return _top_up(pick(10.0**high), costs, errors, target)


def _spent(costs: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    return float(sum(c[i] for c, i in zip(costs, choice, strict=True)))


def _top_up(
    choice: list[int], costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], target: float
) -> list[int]:
    """Raise single layers' options while the budget allows, best error drop per cost first."""
    while True:
        left = target - _spent(costs, choice)
        best = None
        for i, (c, e) in enumerate(zip(costs, errors, strict=True)):
            j = choice[i]
            for up in range(j + 1, len(c)):
                extra, gain = c[up] - c[j], e[j] - e[up]
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, i, up)
        if best is None:
            return choice
        choice[best[1]] = best[2]


def probe_grid(candidates: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` of ``candidates`` (ascending) spread geometrically from the first to
    the last: low ranks, where a budget cuts, get most of the points."""
    if not candidates or count < 1:
        return []
    targets = np.geomspace(candidates[0], candidates[-1], num=count)
    picked = {min(candidates, key=lambda c, t=t: abs(math.log(c / t))) for t in targets}
    return sorted(picked)


def scale_by_measured(
    ranks: Sequence[int], local: np.ndarray, measured: dict[int, float], local_at: dict[int, float]
) -> np.ndarray:
    """``local`` errors at ``ranks`` rescaled to measured ones: the ratio measured / local,
    known at the measured ranks, is interpolated linearly in rank (held flat outside them).
    A layer's own spectrum gives the shape of its curve; the model says how much it counts."""
    points = sorted(r for r in measured if local_at.get(r, 0.0) > 0)
    if not points:
        return local
    ratio = [measured[r] / local_at[r] for r in points]
    return local * np.interp(np.asarray(ranks, dtype=np.float64), points, ratio)


def grid_priorities(count: int) -> list[int]:
    """Priorities of a layer's probe grid (ascending ranks): its middle, its two ends, then
    the rest, so that a budget that cuts leaves every layer a point, then its span."""
    order = list(dict.fromkeys([count // 2, 0, count - 1, *range(count)])) if count else []
    priority = {index: rank for rank, index in enumerate(order)}
    return [priority[index] for index in range(count)]


def candidate_ranks(shape: tuple[int, int], multiple: int) -> list[int]:
    """Candidate ranks: multiples of ``multiple`` that save (r·(K+N) < K·N; such r are below
    min(K, N), the factorization's full rank)."""
    k, n = shape
    return list(range(multiple, (k * n - 1) // (k + n) + 1, multiple))


def allocate_layers(
    layers: Sequence,
    errors: Sequence[np.ndarray],
    reduction: float,
    unit: str,
    multiple: int,
) -> list[int | None]:
    """Ranks removing ``reduction`` of the summed cost (params, or MACs: params x rows) at the
    least summed error, ``errors[i]`` listing layer i's per option (``allocate``); a layer
    gives ``ranks(multiple)``, ``params(rank)`` (None: dense) and ``rows``."""
    options = [[*layer.ranks(multiple), None] for layer in layers]
    costs = [
        np.array([(layer.rows if unit == "macs" else 1.0) * layer.params(r) for r in opts])
        for layer, opts in zip(layers, options, strict=True)
    ]
    choice = allocate(costs, errors, reduction)
    return [opts[i] for opts, i in zip(options, choice, strict=True)]
