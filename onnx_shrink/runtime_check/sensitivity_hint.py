"""Which layers the sensitivity hint keeps in float, planned on ``placement.plan`` alone.

Excluding a layer keeps its weights float, but not always its input: a tensor stays behind
Q/DQ while any quantized node reads it (directly, or through shape ops sharing its scale),
and a quantized Conv's output always gets its Q. basic-pitch's CQT reads the padded audio
with 26 Convs: excluding the worst of them changed nothing (output cosine 0.8036 both ways),
excluding all 26 gave 0.9999. So for each of the worst layers the hint also takes its
*companions*: the quantized nodes that keep its activation inputs quantized (the other
readers of the same tensor, and its quantized producer), repeated until the layer reads float
or no named node is left to take (``COMPANION_LIMIT`` at most).

A layer is *inert* when, taken in order, it has no constants of its own (weights, bias) and
excluding it alone leaves Q/DQ on the same tensors: an Add whose neighbours keep its Q/DQ.
It stays in the ranking but not in the hint (nor do the neighbours, real layers, come in
for a glue node's sake).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnx_shrink.compiler.statistics import Statistics
from onnx_shrink.passes.quant import placement
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check.sensitivity_report import HINT_LAYERS, LayerSensitivity

COMPANION_LIMIT = 64  # companions one layer may bring into the hint


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer to measure: its name in the cloned float model (for ``only``), and its name in
    the caller's model ("" when it has none there)."""

    key: str
    name: str
    op_type: str
    position: int


def plan_hint(
    layers: Sequence[LayerSensitivity],
    targets: Sequence[Target],
    base: ir.Model,
    quant: QuantPass,
    stats: Statistics,
    caller_names: Mapping[ir.Node, str],
    plan: placement.Plan | None = None,
    slots: int = HINT_LAYERS,
) -> tuple[LayerSensitivity, ...]:
    """``layers`` (worst first) with the first ``slots`` the hint can take given their
    companions (by their names in the caller's model, ``caller_names``; unnamed ones there
    cannot be in the hint) and the others among them marked inert; ``plan``: the pass's own
    where the caller has it. Plans only, no runs."""
    by_position = {target.position: target for target in targets}
    nodes = {node.name: node for node in base.graph if node.name}
    exclusions = quant._exclusions
    plan = plan or placement.plan(base.graph, stats, exclusions)
    planner = _Planner(base.graph, stats, exclusions, plan)
    planned = set(plan.nodes)
    result, taken = [], 0
    for layer in layers:
        target = by_position.get(layer.position)
        if taken < slots and not layer.node:
            taken += 1  # the hint cannot name it, but it is one of the worst
        elif taken < slots and target is not None:
            node = nodes[target.key]
            weighted = any(v is not None and v.const_value is not None for v in node.inputs)
            if node not in planned:
                # An embedding table or LSTM (quantized without statistics): its inputs
                # stay float whatever the plan, and excluding it takes nothing else.
                planner.take(node, [])
                taken += 1
            elif not weighted and not planner.changes(node, []):
                layer = dataclasses.replace(layer, inert=True)
            else:
                # Only what the hint can name: a companion unnamed in the caller's model
                # stays quantized, and later layers are planned with it so.
                companions = [c for c in planner.companions(node) if caller_names.get(c)]
                planner.take(node, companions)
                names = tuple(caller_names[c] for c in companions)
                layer = dataclasses.replace(layer, companions=names)
                taken += 1
        result.append(layer)
    return tuple(result)


class _Planner:
    """The plan with the layers taken so far in float."""

    def __init__(
        self,
        graph: ir.Graph,
        stats: Statistics,
        exclusions: placement.Exclusions,
        plan: placement.Plan,
    ):
        """``plan``: the pass's own, under ``exclusions``."""
        self.graph, self.stats, self.exclusions = graph, stats, exclusions
        # Plans by the names kept float: take() asks for the one companions() ended on.
        self._plans = {exclusions.nodes: plan}
        self.plan = plan

    def _plan(self, names: Sequence[str]) -> placement.Plan:
        nodes = (*self.exclusions.nodes, *names)
        if nodes not in self._plans:
            exclusions = dataclasses.replace(self.exclusions, nodes=nodes)
            self._plans[nodes] = placement.plan(self.graph, self.stats, exclusions)
        return self._plans[nodes]

    def take(self, node: ir.Node, companions: Sequence[ir.Node]) -> None:
        names = _names(node, companions)
        self.plan = self._plan(names)
        self.exclusions = dataclasses.replace(
            self.exclusions, nodes=(*self.exclusions.nodes, *names)
        )

    def changes(self, node: ir.Node, companions: Sequence[ir.Node]) -> bool:
        """Whether taking ``node`` (and ``companions``) changes which tensors get Q/DQ."""
        tried = self._plan(_names(node, companions))
        return (set(tried.tensors), dict(tried.shared)) != (
            set(self.plan.tensors),
            dict(self.plan.shared),
        )

    def companions(self, node: ir.Node) -> list[ir.Node]:
        """The named quantized nodes to take with ``node`` so that its activation inputs are
        float in the plan, as far as named nodes and ``COMPANION_LIMIT`` allow."""
        taken: list[ir.Node] = []
        while len(taken) < COMPANION_LIMIT:
            plan = self._plan(_names(node, taken))
            quantized = [v for v in _reads(node) if v.name in plan.tensors]
            keeping = [n for n in _keepers(quantized, plan) if n is not node and n not in taken]
            named = [n for n in keeping if n.name][: COMPANION_LIMIT - len(taken)]
            if not named:
                break
            taken += named
        return taken


def _names(node: ir.Node, companions: Sequence[ir.Node]) -> list[str]:
    return [node.name or "", *(c.name or "" for c in companions)]


def _reads(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.const_value is None and v.name]


def _keepers(quantized: Sequence[ir.Value], plan: placement.Plan) -> list[ir.Node]:
    """The plan's nodes that keep ``quantized`` behind Q/DQ: readers of any tensor sharing
    its scale source, and the producers of those tensors."""
    sources = {plan.shared.get(v.name, v.name) for v in quantized if v.name}

    def shares(value: ir.Value | None) -> bool:
        return value is not None and plan.shared.get(value.name or "", value.name) in sources

    return [
        node
        for node in plan.nodes
        if any(shares(v) for v in node.inputs)
        or any(shares(v) for v in placement.quantized_outputs(node))
    ]
