"""Small edits every rewriting pass makes: names no value has yet, and new initializers."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink.compiler import walk


def value_names(graph: ir.Graph) -> set[str]:
    """The names of ``graph``'s values and those of the graphs inside it (If/Loop/Scan
    bodies): inputs, initializers and node outputs."""
    return {v.name for g in (graph, *graph.subgraphs()) for v in walk.graph_values(g) if v.name}


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_<i>`` with the first ``i`` not in ``taken``; added to ``taken``."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


@dataclasses.dataclass(frozen=True)
class Naming:
    """What ``name_unnamed_nodes`` gave: each new name with the node's old one (None or
    ""), and the names the model's nodes had already."""

    given: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    had: frozenset[str] = frozenset()


def name_unnamed_nodes(model: ir.Model) -> Naming:
    """Name every node of ``model`` that has none (None or ""): its op type and its index
    among the model's nodes in ``walk.all_nodes`` order (``Conv_12``), unique among node
    names; return what was given, for ``restore_names``. Old exporters (torch 1.x, some
    converters) name no node, and what names nodes (``quant.exclude``, the sensitivity
    report's hint, lowrank's probes) then has nothing to name. The same model is named the
    same way in every run."""
    nodes = list(walk.all_nodes(model))
    had = frozenset(node.name for node in nodes if node.name)
    taken = set(had)
    given: dict[str, str | None] = {}
    for index, node in enumerate(nodes):
        if not node.name:
            old = node.name
            node.name = fresh_name(f"{node.op_type}_{index}", taken)
            given[node.name] = old
    return Naming(given, had)


def restore_names(model: ir.Model, naming: Naming) -> None:
    """Undo ``name_unnamed_nodes``: a node carrying a name it gave, or one a pass derived
    from such a name (``MatMul_3_quant``, ``MatMul_3_lowrank_a``: the name and ``_`` and
    more) that the input did not have, gets the old name back, so the result holds the
    names its input had."""
    if not naming.given:
        return
    for node in walk.all_nodes(model):
        node.name = original_name(node.name, naming)


def restore_proto_names(proto: onnx.ModelProto, naming: Naming) -> None:
    """``restore_names`` on a serialized model (a throwaway copy): for the size the model
    takes once written, which the given names would inflate (swift_f0's fold step read +1%
    where the file it wrote was 2% smaller)."""
    if not naming.given:
        return
    graphs: list[onnx.GraphProto | onnx.FunctionProto] = [proto.graph, *proto.functions]
    while graphs:
        for node in graphs.pop().node:
            old = original_name(node.name, naming)
            if old != node.name:
                if old:
                    node.name = old
                else:  # as serializing an unnamed node writes it: no name field
                    node.ClearField("name")
            graphs.extend(walk.proto_bodies(node))


def original_name(name: str | None, naming: Naming) -> str | None:
    """The name the input had for the node now named ``name``: the old one where ``name``
    is one ``name_unnamed_nodes`` gave or a pass derived from one (see ``restore_names``),
    else ``name``."""
    if not name or name in naming.had:
        return name
    base = name
    while base not in naming.given and base not in naming.had and "_" in base:
        base = base.rsplit("_", 1)[0]
    return naming.given[base] if base in naming.given else name


CastKey = tuple[ir.Value, ir.DataType, ir.Graph]


def shared_cast(
    value: ir.Value,
    to: ir.DataType,
    graph: ir.Graph,
    casts: dict[CastKey, ir.Value],
    taken: set[str],
    suffix: str,
    keep_shape: bool = False,
) -> tuple[ir.Value, bool]:
    """``value`` cast to ``to`` by one Cast node in ``graph`` for every reader: made on the
    first call (named ``<value>_<suffix>``, placed right after the producer in ``graph``,
    else first) and kept in ``casts``; returns (the cast value, whether this call made it).
    ``keep_shape``: the cast value carries ``value``'s shape."""
    key = (value, to, graph)
    if key in casts:
        return casts[key], False
    out = ir.Value(name=fresh_name(f"{value.name}_{suffix}", taken), type=ir.TensorType(to))
    if keep_shape and value.shape is not None:
        out.shape = value.shape.copy()
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to)], outputs=[out])
    node.name = out.name
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(graph[0], node)
    else:
        graph.append(node)
    casts[key] = out
    return out, True


def free_initializer_name(graph: ir.Graph, name: str) -> str:
    """``name``, with "_" appended until no initializer of ``graph`` has it."""
    while name in graph.initializers:
        name += "_"
    return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` registered in ``graph`` as the initializer ``name`` (the caller makes the
    name unique), with its shape and dtype on the value."""
    # ir.Tensor, not ir.tensor: that one's isinstance check against the tensor Protocol costs
    # ~0.1 ms a call, a tenth of quantizing a detector's ~500 constants.
    value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def drop_dead_uses(model: ir.Model) -> int:
    """Detach nodes that are in no graph of ``model`` from the values they still read;
    returns how many uses were dropped.

    Removing a node detaches its own inputs, but not those of the nodes in its bodies: when
    onnxscript's constant folder replaces an If by one branch, the other branch's nodes stay
    users of the outer weights they read (Silero VAD: 26 uses after ``fold``), and a pass
    asking who reads a weight meets nodes in no graph.
    """
    live = {id(node) for graph in model.graphs() for node in graph}
    dropped = 0
    for graph in model.graphs():
        values = [*graph.inputs, *graph.initializers.values()]
        values += [output for node in graph for output in node.outputs]
        for value in values:
            for use in list(value.uses()):
                if id(use.node) not in live:
                    use.node.replace_input_with(use.idx, None)
                    dropped += 1
    return dropped


NO_DEFAULT_INPUTS_IR_VERSION = 4  # from IR 4 on, an initializer need not be a graph input


WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1, "Gather": 0}
"""The input of these ops that holds a layer's weight (a Gather's: its table)."""


def weights_listed_as_inputs(model: ir.Model) -> list[ir.Value]:
    """The main graph's initializers that are also graph inputs where the listing says
    nothing about a caller feeding them: IR 3 requires every initializer to be listed, and
    old exporters kept listing them all (``torch.onnx.export(keep_initializers_as_inputs=
    True)``), layer weights included. A model of IR 4 on is taken to list them only out of
    that habit where every layer weight (a matrix or kernel read by Conv, MatMul, Gemm or
    Gather) is listed, and there is one; otherwise what it lists are defaults a caller may
    override, and they stay inputs (``y = x * scale``). Other initializers may be unlisted:
    torch's constant folding adds a Reshape's shape after the listing (a captcha CNN's 52
    listed weights and one unlisted shape were all kept as inputs, and no pass compressed
    anything)."""
    graph = model.graph
    listed = [v for v in graph.inputs if v.name in graph.initializers]
    if not listed:
        return []
    if model.ir_version < NO_DEFAULT_INPUTS_IR_VERSION:
        return listed
    unlisted = [v for v in graph.initializers.values() if not v.is_graph_input()]
    if any(_is_layer_weight(v) for v in unlisted) or not any(_is_layer_weight(v) for v in listed):
        return []
    return listed


def _is_layer_weight(value: ir.Value) -> bool:
    tensor = value.const_value
    if tensor is None or len(tensor.shape) < 2:
        return False
    return any(WEIGHT_INPUTS.get(use.node.op_type) == use.idx for use in value.uses())


def unlist_weight_inputs(model: ir.Model) -> int:
    """Drop ``weights_listed_as_inputs`` from the graph inputs (raising an IR 3 model to
    IR 4, which allows that), so the passes see them as the constants they are; how many."""
    listed = weights_listed_as_inputs(model)
    if listed:
        dropped = {id(v) for v in listed}
        kept = [v for v in model.graph.inputs if id(v) not in dropped]
        model.graph.inputs.clear()
        model.graph.inputs.extend(kept)
        model.ir_version = max(model.ir_version, NO_DEFAULT_INPUTS_IR_VERSION)
    return len(listed)


def lift_constant_weights(
    model: ir.Model, size_limit: int = 16, read_by: Collection[str] | None = None
) -> bool:
    """Weights stored as Constant nodes (Paddle, some torch exports) become initializers, so
    the weight passes find them as any other (PP-OCRv4 rec: without ``fold`` first,
    quant-weight found no weight at all; PicoDet's 102 Conv weights, prune-channels none).
    Constants of fewer than ``size_limit`` elements stay nodes, and with ``read_by`` (op
    types), so do those no node of these types reads: a pass that rewrites only MatMuls then
    leaves a Conv model as it was (quant-dynamic on PicoDet lifted 486 Constants and, having
    quantized nothing, still read as a change). Returns whether any was lifted; none at IR
    version < 4, where initializers must be graph inputs too."""
    if model.ir_version < 4:
        return False
    wanted = None if read_by is None else set(read_by)
    lifted = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if (
            node.op_type != "Constant"
            or node.domain not in ("", "onnx.ai")
            or node.outputs[0].is_graph_output()
            or (wanted is not None and not _read_by(node.outputs[0], wanted))
        ):
            continue
        lifted |= _lift_one(node, size_limit)
    return lifted


# What a weight may pass through on its way to the node that reads it (half_weights' Cast).
_WEIGHT_VIEWS = frozenset({"Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


def _read_by(value: ir.Value, op_types: set[str], depth: int = 3) -> bool:
    """Whether a node of ``op_types`` reads ``value``, directly or through ``_WEIGHT_VIEWS``."""
    for user, _ in value.uses():
        if user.op_type in op_types:
            return True
        if depth and user.op_type in _WEIGHT_VIEWS and user.outputs:
            if _read_by(user.outputs[0], op_types, depth - 1):
                return True
    return False


def _lift_one(node: ir.Node, size_limit: int) -> bool:
    """Make one Constant node's ``value`` tensor (if at least ``size_limit`` elements) an
    initializer of its graph, as onnx-ir's ``LiftConstantsToInitializersPass`` does (one
    walk here, for the constants ``read_by`` keeps as well as for all)."""
    attribute = node.attributes.get("value")
    if len(node.attributes) != 1 or attribute is None:
        return False
    tensor = attribute.as_tensor()
    if tensor.size < size_limit:
        return False
    output = node.outputs[0]
    initializer = ir.Value(
        name=output.name,
        shape=tensor.shape,
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
        metadata_props=output.metadata_props.copy(),
    )
    initializer.meta.update(output.meta)
    node.graph.register_initializer(initializer)
    output.replace_all_uses_with(initializer)
    node.graph.remove(node, safe=True)
    return True
