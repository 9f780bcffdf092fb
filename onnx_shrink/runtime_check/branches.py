"""The If branches a check runs: which branches the passes rewrote, and which of those the
check's data never took.

A branch the data never takes is not checked, however the passes changed it: openWakeWord's
hey_jarvis ends in ``If(score >= 0.5)``, whose then-branch runs on every real detection; on
data without the wake word ``fold,prune``'s check read cosine 0.995, and 0.888 forced through
the pruned branch. The check reads each such If's condition beside the reference's outputs
(a scalar) and says which rewritten branch no sample took.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink.compiler import walk

BRANCHES = ("then_branch", "else_branch")


@dataclasses.dataclass
class BranchWatch:
    """The main graph's If nodes whose branches the candidate rewrote, and the conditions
    seen so far."""

    changed: dict[str, tuple[str, list[str]]]
    """condition value name -> (the If's label, its rewritten branches)"""
    nodes: dict[tuple[str, str], int]
    """(the If's label, branch) -> the reference branch's node count"""
    read: list[str]
    """the conditions to read from the reference's runs (those not fed as graph inputs)"""
    seen: dict[str, set[bool]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, reference: ir.Model, candidate: ir.Model) -> BranchWatch | None:
        """The watch for ``reference`` against ``candidate`` (If nodes matched by name, else
        by order), None where no If branch differs."""
        ours, theirs = _if_nodes(reference), _if_nodes(candidate)
        changed: dict[str, tuple[str, list[str]]] = {}
        nodes: dict[tuple[str, str], int] = {}
        for index, node in enumerate(ours):
            other = _match(node, index, ours, theirs)
            cond = node.inputs[0] if node.inputs else None
            if other is None or cond is None or not cond.name or cond.const_value is not None:
                continue  # folded away, or a constant condition: one branch by design
            label = node.name or f"<unnamed If #{index}>"
            rewritten = [b for b in BRANCHES if _branch_bytes(node, b) != _branch_bytes(other, b)]
            if rewritten:
                changed[cond.name] = (label, rewritten)
                for branch in rewritten:
                    nodes[(label, branch)] = len(
                        list(
                            ir.traversal.RecursiveGraphIterator(node.attributes[branch].as_graph())
                        )
                    )
        if not changed:
            return None
        fed = {value.name for value in reference.graph.inputs}
        return cls(changed, nodes, [name for name in changed if name not in fed])

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """Record the conditions among ``values`` (a run's outputs and feed)."""
        for name in self.changed:
            if name in values:
                taken = np.unique(np.asarray(values[name]).astype(bool)).tolist()
                self.seen.setdefault(name, set()).update(taken)

    def untested(self) -> tuple[str, ...]:
        """One line per rewritten branch no sample took."""
        lines = []
        for name, (label, rewritten) in self.changed.items():
            seen = self.seen.get(name, set())
            for branch in rewritten:
                if (branch == "then_branch") in seen:
                    continue
                lines.append(
                    f"If '{label}': its {branch} ({self.nodes[(label, branch)]} nodes), which "
                    f"the passes rewrote, never ran on the check's data ('{name}' was "
                    f"{'never true' if branch == 'then_branch' else 'never false'}): give "
                    "samples that take it"
                )
        return tuple(lines)


def _if_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == "If" and node.domain in ("", "ai.onnx")]


def _match(node: ir.Node, index: int, ours: list[ir.Node], theirs: list[ir.Node]):
    if node.name:
        return next((other for other in theirs if other.name == node.name), None)
    return theirs[index] if len(ours) == len(theirs) else None


def _branch_bytes(node: ir.Node, branch: str) -> bytes:
    """The branch as computed: without what a cleanup changes and a run ignores (doc strings,
    metadata such as exporters' stack traces, value annotations), with the constants it
    reads from the graphs around it (hey_jarvis's verifier weights are the main graph's
    initializers: ``prune`` zeroed half of them, and the branch's own bytes stayed the same)."""
    attribute = node.attributes.get(branch)
    if attribute is None:
        return b""
    graph = attribute.as_graph()
    proto = ir.serde.serialize_graph(graph)
    _strip(proto)
    digest = hashlib.sha256(proto.SerializeToString())
    for value in _captured_constants(graph):
        digest.update(f"{value.name}:{value.const_value.dtype}:{value.shape}".encode())
        digest.update(value.const_value.tobytes())
    return digest.digest()


def _captured_constants(graph: ir.Graph) -> list[ir.Value]:
    """The constants (initializers) of the graphs around ``graph`` that its nodes, or those
    of its own subgraphs, read."""
    inside: set[ir.Value] = set()
    read: dict[ir.Value, None] = {}
    for scope, _ in walk.scopes(graph):
        inside.update(walk.graph_values(scope))
        for inner in scope:
            read.update(dict.fromkeys(v for v in inner.inputs if v is not None))
    return [v for v in read if v not in inside and v.const_value is not None]


def _strip(graph: onnx.GraphProto) -> None:
    graph.ClearField("doc_string")
    graph.ClearField("value_info")
    del graph.metadata_props[:]
    for node in graph.node:
        node.ClearField("doc_string")
        del node.metadata_props[:]
        for body in walk.proto_bodies(node):
            _strip(body)
