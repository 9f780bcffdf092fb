"""What a combined run (``combined``) computes, in multiply-accumulates, to foretell its time.

A combined run computes the float graph once and, for each copy, only what its edit changed:
the edited node and every node downstream of it. A copy editing a CNN's first Conv repeats
the whole network; one editing its classifier repeats one Gemm. Runs grouped in graph order
(``sensitivity`` measures its layers so) thus cost very different times: on a PicoDet layout
model the first run of 8 early, high-resolution layers foretold 57 min at its pace, for a
report that took 691 s. Weighted by what each run computes, the first run's pace foretells
the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnx_shrink.compiler import stats, walk


def node_costs(graph: ir.Graph) -> dict[ir.Node, float]:
    """Each node's multiply-accumulates (``stats.node_macs``; symbolic dims count 1); every
    node 1 where no node's are known (a graph of elementwise ops), so counts stand in."""
    macs = {node: float(stats.node_macs(node) or 0) for node in graph}
    if not any(macs.values()):
        return dict.fromkeys(macs, 1.0)
    return macs


def downstream_cost(node: ir.Node, costs: dict[ir.Node, float]) -> float:
    """The cost of ``node`` and of every node that reads its outputs, directly or not
    (``compiler.walk.downstream``; a node ``costs`` lacks, one inside a subgraph, adds nothing)."""
    return sum(costs.get(n, 0.0) for n in walk.downstream([node]))


def run_costs(graph: ir.Graph, groups: Sequence[Sequence[ir.Node]]) -> list[float]:
    """Each group's combined run: the float graph plus, per edited node, its downstream."""
    costs = node_costs(graph)
    whole = sum(costs.values())
    return [whole + sum(downstream_cost(n, costs) for n in group) for group in groups]


def seconds_left(spent: float, costs: Sequence[float], done: int) -> float:
    """The time the runs after the first ``done`` will take, at the pace of those done
    (``spent`` seconds for ``costs[:done]``)."""
    done_cost = sum(costs[:done])
    if done_cost <= 0:
        return 0.0
    return spent * sum(costs[done:]) / done_cost
