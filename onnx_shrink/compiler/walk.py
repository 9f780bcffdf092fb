"""Walk every place of a model that can hold nodes or tensors.

Passes and accounting must see the main graph, every If/Loop/Scan body at any depth, and
every model-local function; these iterators are the one way the project does that.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import onnx
import onnx_ir as ir


def onnx_opset(model: ir.Model) -> int:
    """The model's version of the default ONNX domain (1 when it imports none)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Yield every node of the model: main graph, subgraphs and functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def nodes_of(model: ir.Model, op_types: Collection[str]) -> list[ir.Node]:
    """The standard-domain nodes of ``op_types`` in ``model``'s graph and subgraphs."""
    return [
        node
        for graph in model.graphs()
        for node in graph
        if node.domain in ("", "ai.onnx") and node.op_type in op_types
    ]


def initializer_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.TensorProtocol]]:
    """Yield (value, tensor) for every initializer of the main graph and of every subgraph."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value


def constant_node_tensors(model: ir.Model) -> Iterator[tuple[ir.Node, ir.TensorProtocol]]:
    """Yield (node, tensor) for every ``Constant`` node that holds a tensor ``value``."""
    for node in all_nodes(model):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            # A function's Constant may refer to the function's attribute: no tensor here.
            if attr is not None and attr.type == ir.AttributeType.TENSOR and not attr.is_ref():
                # attr.value, not as_tensor(): its isinstance check against the tensor
                # Protocol takes ~0.1 ms, most of accounting's time on a model of constants.
                yield node, attr.value


def all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Yield every stored tensor: initializers and Constant-node values, everywhere."""
    for _, tensor in initializer_tensors(model):
        yield tensor
    for _, tensor in constant_node_tensors(model):
        yield tensor


def scopes(
    graph: ir.Graph, owner: ir.Node | None = None
) -> Iterator[tuple[ir.Graph, ir.Node | None]]:
    """``graph`` and every If/Loop/Scan body in it at any depth, each with the node that owns
    it (None for ``graph``), outer graphs before their bodies."""
    yield graph, owner
    for node in graph:
        for body in bodies(node):
            yield from scopes(body, node)


def bodies(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs ``node``'s attributes hold (an If's two branches, a Loop's body)."""
    for attr in node.attributes.values():
        if attr.is_ref():  # a function's reference to its own attribute: no graph here
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def holder_in(graph: ir.Graph, node: ir.Node) -> ir.Node | None:
    """The node of ``graph`` that is ``node`` or holds it in a body at any depth (a Loop
    whose body holds it); None where ``node`` is in neither."""
    if node.graph is graph:  # the usual case: no walk of the bodies
        return node
    owners = {body: owner for body, owner in scopes(graph) if owner is not None}
    while node.graph is not graph:
        if node.graph not in owners:
            return None
        node = owners[node.graph]
    return node


def insert_before_holder(graph: ir.Graph | None, node: ir.Node, new: ir.Node) -> None:
    """Insert ``new`` into ``graph`` before ``holder_in(graph, node)``: where ``node`` is in
    a body, ``new`` runs in the outer graph before the node that holds that body."""
    holder = holder_in(graph, node) if graph is not None else None
    if graph is None or holder is None:
        raise ValueError(f"node {node.name!r} is not in the graph or any of its bodies")
    graph.insert_before(holder, new)


def proto_bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """``bodies`` of a serialized node: the graphs its attributes hold."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def graph_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """The values ``graph`` defines: its inputs, initializers and node outputs (not its
    bodies')."""
    yield from graph.inputs
    yield from graph.initializers.values()
    yield from (output for node in graph for output in node.outputs)


def downstream(nodes: Iterable[ir.Node]) -> set[ir.Node]:
    """``nodes`` and every node that reads their outputs, directly or not (inside a subgraph
    too)."""
    cone: set[ir.Node] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node not in cone:
            cone.add(node)
            pending += (use.node for out in node.outputs for use in out.uses())
    return cone
