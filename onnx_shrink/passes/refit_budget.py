"""The time a pass's least-squares refits may take (``prune.refit_seconds``), shared fairly.

Refits cost from milliseconds (MiniLM's 384-wide layers) to minutes (a 4096 -> 1024 layer:
conjugate gradients over 1024 rows). Spent first come, first served, a budget refit the first
layers in full and left the last ones with nothing (a 0.6 GB encoder: 41 of 72 refit, the
last 31 not at all). Here a layer solved directly (all or nothing, cheap next to conjugate
gradients) is refit where it fits in what is left; one solved by conjugate gradients, whose
every iteration lowers its error, gets the part of what the later direct solves leave that
its expected cost is of its own and the later conjugate-gradient layers', and runs as many
iterations as that pays for (at least ``MIN_ITERATIONS``). Where everything fits, every
layer is refit in full, exactly as without a budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from onnx_shrink.passes.reconstruct import (
    EXPECTED_ITERATIONS,
    SolveCosts,
    solve_costs,
)
from onnx_shrink.wording import counted

logger = logging.getLogger(__name__)

MIN_ITERATIONS = 10
"""fewer conjugate-gradient iterations than this hardly move a layer: it stays unrefit"""


class RefitClock:
    """Seconds the refits of one pass have taken and will take: estimated from a small timed
    direct solve and a timed matrix product, then corrected by how the refits done since
    compared with their estimates."""

    PROBE_SIZE = 256

    def __init__(self) -> None:
        self.seconds = 0.0
        self.estimated = 0.0
        rng = np.random.default_rng(0)
        a = rng.standard_normal((self.PROBE_SIZE, self.PROBE_SIZE))
        system = a @ a.T + np.eye(self.PROBE_SIZE)
        started = time.perf_counter()
        np.linalg.solve(system[None].repeat(4, axis=0), np.ones((4, self.PROBE_SIZE, 1)))
        self._cube_rate = (time.perf_counter() - started) / (4 * self.PROBE_SIZE**3)
        started = time.perf_counter()
        np.dot(system, system)
        self._product_rate = (time.perf_counter() - started) / self.PROBE_SIZE**3

    def estimate(self, costs: SolveCosts, iterations: int = EXPECTED_ITERATIONS) -> float:
        """Seconds a refit of these costs should take, by the timed probes."""
        return costs.cubes * self._cube_rate + costs.products(iterations) * self._product_rate

    def iterations_within(self, costs: SolveCosts, seconds: float) -> int:
        """The conjugate-gradient iterations that ``seconds`` (projected) pay for, after the
        direct solves and the preconditioner (0 where none, or nothing is left)."""
        if costs.per_iteration <= 0:
            return 0
        spare = seconds / self._ratio() - self.estimate(costs, iterations=0)
        return max(0, int(spare / (costs.per_iteration * self._product_rate)))

    def projected(self, estimate: float) -> float:
        """``estimate`` corrected by how the refits done so far compared with theirs."""
        return estimate * self._ratio()

    def add(self, estimate: float, seconds: float) -> None:
        self.estimated += estimate
        self.seconds += seconds

    def _ratio(self) -> float:
        return self.seconds / self.estimated if self.estimated > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class Allotment:
    """What one layer's refit may do: ``iterations`` None runs it in full."""

    iterations: int | None
    estimate: float  # the clock's estimate of the refit as allotted, for ``RefitBudget.spent``


class RefitBudget:
    """``seconds`` shared among the refits of the layers ``expected`` names (key -> what its
    refit is expected to cost: ``solve_costs`` of its mask, or ``uniform_costs`` of its
    shape before the mask is known), asked about in that order.

    Direct solves (all or nothing, and cheap next to conjugate gradients on the same layers)
    come first: one is refit where it fits in what is left. Conjugate-gradient layers share
    what the later direct solves leave, each in proportion to its cost in full."""

    def __init__(self, seconds: float, expected: dict[object, SolveCosts]) -> None:
        self.seconds = seconds
        self.clock = RefitClock()
        self._expected = dict(expected)
        self.partial: list[tuple[str, float]] = []  # (layer, projected seconds of the rest)
        self.unrefit: list[tuple[str, float]] = []  # (layer, projected seconds in full)

    def allot(self, key: object, name: str, keep: np.ndarray) -> Allotment | None:
        """The refit layer ``key`` (``name`` in warnings) may do with mask ``keep``; None: it
        stays unrefit. Layers before ``key`` not asked about were not refit at all."""
        keys = list(self._expected)
        later = keys[keys.index(key) + 1 :] if key in self._expected else keys
        self._expected = {k: self._expected[k] for k in later}
        costs = solve_costs(keep)
        full = self.clock.estimate(costs)
        projected = self.clock.projected(full)
        available = self.seconds - self.clock.seconds
        direct, iterative = self._later(available - projected)
        if projected + direct + iterative <= available:
            return Allotment(None, full)
        if costs.per_iteration <= 0:  # all or nothing
            if projected <= available:
                return Allotment(None, full)
            self.unrefit.append((name, projected))
            return None
        pool = available - direct
        share = pool * projected / (projected + iterative) if pool > 0 else 0.0
        iterations = self.clock.iterations_within(costs, share)
        if iterations >= EXPECTED_ITERATIONS:
            return Allotment(None, full)
        if iterations >= MIN_ITERATIONS:
            allotted = self.clock.estimate(costs, iterations)
            self.partial.append((name, projected - self.clock.projected(allotted)))
            return Allotment(iterations, allotted)
        self.unrefit.append((name, projected))
        return None

    def _later(self, available: float) -> tuple[float, float]:
        """Projected seconds of the layers still to come, in full: (their direct solves that
        will fit in ``available``, taken in order as they will be, their conjugate
        gradients). A direct solve past what is left would reserve time it never uses."""
        direct = iterative = 0.0
        for costs in self._expected.values():
            seconds = self.clock.projected(self.clock.estimate(costs))
            if costs.per_iteration > 0:
                iterative += seconds
            elif direct + seconds <= available:
                direct += seconds
        return direct, iterative

    def spent(self, allotment: Allotment, seconds: float) -> None:
        self.clock.add(allotment.estimate, seconds)

    def warn(self) -> None:
        """One warning for the layers the budget did not refit in full."""
        if not (self.partial or self.unrefit):
            return
        parts = []
        if self.partial:
            stopped = "conjugate gradients stopped at their share"
            partly = counted(len(self.partial), "layer")
            parts.append(f"{partly} refit partly ({stopped}: {_names(self.partial)})")
        if self.unrefit:
            unrefit = counted(len(self.unrefit), "layer")
            parts.append(f"{unrefit} left unrefit ({_names(self.unrefit)})")
        more = sum(seconds for _, seconds in self.partial + self.unrefit)
        logger.warning(
            "prune: %s: refitting them in full would take about %s more than "
            "refit_seconds=%g allows; raise prune.refit_seconds to refit them",
            "; ".join(parts),
            f"{more:.0f} s" if more >= 1 else "a second",
            self.seconds,
        )


def _names(layers: list[tuple[str, float]]) -> str:
    return ", ".join(name for name, _ in layers[:3]) + (" ..." if len(layers) > 3 else "")
