"""Constant subexpressions over large weights, folded whole (``fold``'s helper).

onnxscript's folder decides node by node: an input above its ``input_size_limit`` folds only
where this node is its sole reader, since folding one reader of a weight others still read
would store a second copy. An exporter that reorders a weight at run time reads it several
times: torch's LSTM export slices ``weight_ih`` into its four gates and concatenates them in
ONNX's order (``Unsqueeze(Concat(Slice(W), Slice(W), ...))``), and weight normalization
divides ``v`` by its own norm (``g * v / ReduceL2(v)``). No single fold pays there, but the
whole expression does: its result is no larger than the weights only it reads. Left
unfolded, the weight stays behind a chain of nodes, and no weight-quantizing pass sees it
(Silero VAD's LSTM stayed float under ``quant-dynamic``).

Rules:

1. A *cone* is a connected set of nodes of ``CONE_OPS`` (default domain) whose inputs are all
   constants (initializers that are not graph inputs) or outputs of the cone's nodes; its
   *results* are the outputs read outside it (by another node, a subgraph, or none of the
   cone).
2. A cone is folded when one of its constant inputs holds more than ``input_size_limit``
   elements, and its results' bytes are at most the bytes of the constants only the cone
   reads, which then die. onnxscript declines such a cone node by node where the weight has
   another reader, where a result is past its output limit (a tf2onnx LSTM's 1280 x 1024
   kernel Cast to float16 in a Loop body), and at any Split with several outputs. Results
   that are graph outputs leave the cone alone.
3. The results are computed by onnx's reference evaluator on the cone alone and become
   initializers under the results' names; the cone's nodes and dead constants are left to
   the dead-code removal that follows.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import onnx.reference
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.fold_reshape import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

# Data movement and arithmetic an exporter puts between a weight and its reader.
CONE_OPS = frozenset(
    {
        "Abs", "Add", "Cast", "Clip", "Concat", "Div", "Exp", "Expand", "Flatten", "Gather",
        "Identity", "Log", "Max", "Min", "Mul", "Neg", "Pow", "Reciprocal", "ReduceL2",
        "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "ReduceSumSquare", "Reshape",
        "Sigmoid", "Slice", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
        "Unsqueeze", "Where",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FoldWeightConesPass(ir.passes.InPlacePass):
    """Fold cones of constant nodes over large weights (module docstring)."""

    input_size_limit: int

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for graph in model.graphs():
            for cone in _cones(graph):
                folded += _fold_if_it_pays(model, graph, cone, self.input_size_limit)
        if folded:
            logger.debug("fold: %d constant cones over shared weights folded whole", folded)
        return ir.passes.PassResult(model, folded > 0)


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or (value.const_value is not None and not value.is_graph_input())


def _cones(graph: ir.Graph) -> list[list[ir.Node]]:
    """The graph's cones (rule 1), each in graph order."""
    members: dict[ir.Node, int] = {}  # node -> its cone's root in ``parent``
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in graph:
        if node.op_type not in CONE_OPS or node.domain not in DEFAULT_DOMAINS:
            continue
        inside = [v.producer() for v in node.inputs if v is not None and v.producer() in members]
        if not all(_is_constant(v) or v.producer() in members for v in node.inputs):
            continue
        index = len(parent)
        parent.append(index)
        members[node] = index
        # Joined to its producers' cones and to the cones of nodes reading the same weights.
        for other in inside + [use.node for v in node.inputs if v is not None for use in v.uses()]:
            if other in members:
                parent[root(members[other])] = root(index)
    cones: dict[int, list[ir.Node]] = {}
    for node, index in members.items():
        cones.setdefault(root(index), []).append(node)
    return list(cones.values())


def _fold_if_it_pays(model: ir.Model, graph: ir.Graph, cone: list[ir.Node], limit: int) -> bool:
    """Rule 2's test, then rule 3; whether the cone was folded."""
    members = set(cone)
    constants = {v for n in cone for v in n.inputs if v is not None and v.producer() not in members}
    if not any(v.const_value is not None and v.const_value.size > limit for v in constants):
        return False
    results = [
        v
        for n in cone
        for v in n.outputs
        if v.is_graph_output() or any(use.node not in members for use in v.uses())
    ]
    if not results or any(v.is_graph_output() for v in results):
        return False
    if any(not v.name for n in cone for v in n.outputs if v.uses()):
        return False  # the evaluator's graph joins nodes by value names
    dying = sum(
        v.const_value.nbytes
        for v in constants
        if v.const_value is not None
        and not v.is_graph_output()
        and all(use.node in members for use in v.uses())
    )
    arrays = _evaluate(model, cone, constants, results)
    if arrays is None or sum(a.nbytes for a in arrays) > dying:
        return False
    for value, array in zip(results, arrays, strict=True):
        name = value.name
        assert name is not None
        value.name = f"{name}__folded_cone"
        folded = graph_edit.add_initializer(graph, name, array)
        ir.convenience.replace_all_uses_with(value, folded)
    return True


def _in_memory(tensor: ir.TensorProtocol) -> onnx.TensorProto:
    return ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype))


def _evaluate(model, cone, constants, results):
    """The cone's results on onnx's reference evaluator, or None where it fails."""
    if any(not v.name for v in constants):
        return None
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in cone],
            "cone",
            [],
            [onnx.helper.make_empty_tensor_value_info(v.name) for v in results],
            # From their values: a weight io.load left in the model file serializes as an
            # external-data reference, which the evaluator refuses.
            [_in_memory(v.const_value) for v in constants],
        ),
        opset_imports=[
            onnx.helper.make_opsetid(domain, version)
            for domain, version in model.opset_imports.items()
        ],
    )
    for value, tensor in zip(constants, proto.graph.initializer, strict=True):
        tensor.name = value.name
    try:
        return onnx.reference.ReferenceEvaluator(proto).run(None, {})
    except Exception as e:  # noqa: BLE001 - any failure leaves the cone to the node-wise folder
        names = ", ".join(n.name or n.op_type for n in cone[:3])
        logger.debug("fold: not folding the cone of %s: %r", names, e)
        return None
