"""Accounting of a model: nodes, parameters, tensor bytes and multiply-accumulates.

MACs are counted for Conv, ConvTranspose, MatMul and Gemm (and their integer and QLinear
forms: a quantized model computes as many) per *one sample*: symbolic
dimensions (batch, sequence) count as 1, so the figure compares models, not workloads. Where
shape inference leaves a node's activations without shapes or dims (Paddle exports, dynamic
Reshape), a node with a 2-D or Conv weight still has known MACs *per row* (MatMul/Gemm: K·N)
or per output position (Conv: Cout·Cin/group·kernel), and unknown rows count once, as
symbolic dims do. Only a node without either (activation x activation MatMul) is left out and
counted in ``nodes_without_macs``, so a reader knows the figure is a lower bound.

``measure(model, shapes)`` counts on the shapes of a real run instead (``shapes``: dims by
value name, as ``runtime_check.shapes.observed`` records them): the MACs of that workload.
``measure(model, input_dims=...)`` counts one sample of those input dims (a detector's height
and width, say, which would otherwise count as 1 each): shape inference propagates them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import onnx
import onnx.helper as oh
import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.io import large_tensors

if TYPE_CHECKING:  # the pipeline measures its steps with this module
    from onnx_shrink.compiler import pipeline

logger = logging.getLogger(__name__)

# (domain, op type) -> (the float op it computes as, index of x, index of the weight)
_FORMS = {
    ("", "MatMul"): ("MatMul", 0, 1),
    ("", "MatMulInteger"): ("MatMul", 0, 1),
    ("", "QLinearMatMul"): ("MatMul", 0, 3),
    ("com.microsoft", "DynamicQuantizeMatMul"): ("MatMul", 0, 1),
    ("com.microsoft", "MatMulIntegerToFloat"): ("MatMul", 0, 1),
    # Block-quantized weights (quant-weight): packed [N, blocks, bytes]; K and N are attributes.
    ("com.microsoft", "MatMulNBits"): ("MatMulNBits", 0, 1),
    ("", "Gemm"): ("Gemm", 0, 1),
    ("", "Conv"): ("Conv", 0, 1),
    ("", "ConvInteger"): ("Conv", 0, 1),
    ("", "QLinearConv"): ("Conv", 0, 3),
    ("", "ConvTranspose"): ("ConvTranspose", 0, 1),
    # Recurrent layers: X [steps, batch, in] (layout 1: [batch, steps, in]), W and R at 1, 2.
    ("", "LSTM"): ("Recurrent", 0, 1),
    ("", "GRU"): ("Recurrent", 0, 1),
    ("", "RNN"): ("Recurrent", 0, 1),
    ("com.microsoft", "DynamicQuantizeLSTM"): ("Recurrent", 0, 1),
}


def is_mac_node(node: ir.Node) -> bool:
    """Does ``node`` multiply-accumulate: Conv, ConvTranspose, MatMul, Gemm, LSTM, GRU, RNN
    or an integer / QLinear / dynamically quantized form of one?"""
    return _form(node) is not None


def _form(node: ir.Node) -> tuple[str, int, int] | None:
    """``_FORMS``' entry for ``node`` (None if it does not multiply-accumulate)."""
    return _FORMS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """What a model holds; all counts include subgraphs and model-local functions. ``macs``
    are one run's: an If's larger branch (a run takes one), a Loop or Scan body once."""

    nodes: int
    params: int
    tensor_bytes: int
    macs: int
    nodes_without_macs: int
    op_types: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


Shapes = Mapping[str, Sequence[int]]
"""Concrete dims by value name (a real run's, see ``runtime_check.shapes``)."""


def measure(
    model: ir.Model, shapes: Shapes | None = None, input_dims: Shapes | None = None
) -> ModelStats:
    """Count what ``model`` holds, its MACs on ``shapes`` where given (a value missing from
    them falls back to inferred shapes), inferred from ``input_dims`` (graph input -> dims)
    where those are given. The model is not modified (shape inference runs on a serialized
    copy of its graph)."""
    nodes = list(walk.all_nodes(model))
    tensors = list(walk.all_tensors(model))
    mac_nodes = [node for node in nodes if is_mac_node(node)]
    symbolic: set[str] = set()
    inferred = _with_inferred_shapes(model, mac_nodes, shapes or {}, input_dims or {}, symbolic)
    counts = {node: node_macs(node, inferred) for node in mac_nodes}
    known = {node: count for node, count in counts.items() if count is not None}
    unknown = len(counts) - len(known)
    if shapes or input_dims:
        # A workload's MACs: a dim inference could not fix makes the node's count a bound.
        unknown += sum(not _exact(node, inferred, symbolic) for node in known)
    unpacked = _unpacked_elements(nodes)
    return ModelStats(
        nodes=len(nodes),
        params=sum(unpacked.get(id(t), math.prod(t.shape.numpy())) for t in tensors)
        + sum(map(_attribute_params, nodes)),
        tensor_bytes=sum(t.nbytes for t in tensors),
        macs=_one_run(model, known),
        nodes_without_macs=unknown,
        op_types=dict(collections.Counter(n.op_type for n in nodes).most_common()),
    )


def _one_run(model: ir.Model, known: Mapping[ir.Node, int]) -> int:
    """The MACs of ``known`` nodes one run computes: both branches of an If counted read
    Silero VAD's network twice. A model-local function counts once."""

    def in_graph(graph: Iterable[ir.Node]) -> int:
        total = 0
        for node in graph:
            total += known.get(node, 0)
            bodies = [in_graph(body) for body in walk.bodies(node)]
            if bodies:
                branches = node.op_type == "If" and node.domain in ("", "ai.onnx")
                total += max(bodies) if branches else sum(bodies)
        return total

    return in_graph(model.graph) + sum(map(in_graph, model.functions.values()))


ML_DOMAIN = "ai.onnx.ml"


def _attribute_params(node: ir.Node) -> int:
    """Learned values an ``ai.onnx.ml`` node holds in its attributes: a tree ensemble's split
    thresholds and leaf weights, a linear model's coefficients (float lists and tensors; the
    integer ones, its tree structure, feature ids and split modes, are not counted)."""
    if node.domain != ML_DOMAIN:
        return 0
    count = 0
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.FLOATS:
            count += len(attr.value)
        elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype.is_floating_point():
            count += math.prod(attr.value.shape.numpy())  # not nodes_modes' uint8 codes
    return count


def _unpacked_elements(nodes: Sequence[ir.Node]) -> dict[int, int]:
    """Parameters of packed weights by ``id`` of their tensor. onnxruntime's MatMulNBits and
    GatherBlockQuantized store 4-bit codes two to a uint8: counted as bytes, they read as
    half the parameters."""
    result = {}
    for node in nodes:
        if node.domain != "com.microsoft":
            continue
        if node.op_type == "MatMulNBits" and len(node.inputs) > 1:
            weight, dims = node.inputs[1], _nbits_weight_dims(node)
            elements = math.prod(dims) if dims else 0
        elif node.op_type == "GatherBlockQuantized" and node.inputs:
            weight = node.inputs[0]
            bits = node.attributes.get_int("bits", 4)
            packed = weight is not None and weight.dtype == ir.DataType.UINT8 and bits in (2, 4)
            shape = weight.shape if weight is not None and packed else None
            elements = math.prod(shape.numpy()) * 8 // bits if shape is not None else 0
        else:
            continue
        if weight is not None and weight.const_value is not None and elements > 0:
            result[id(weight.const_value)] = elements
    return result


def _nbits_weight_dims(node: ir.Node) -> list[int] | None:
    """[K, N] of a MatMulNBits' packed weight, from its attributes (None if one is missing)."""
    dims = [node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)]
    return dims if all(dims) else None


def mac_shapes(model: ir.Model) -> Shapes:
    """The dims ``node_macs`` reads for ``model``'s MAC nodes (inferred where the model does
    not annotate them), as ``measure`` counts them."""
    mac_nodes = [node for node in walk.all_nodes(model) if is_mac_node(node)]
    return _with_inferred_shapes(model, mac_nodes, {}, {})


def _with_inferred_shapes(
    model: ir.Model,
    mac_nodes: Sequence[ir.Node],
    shapes: Shapes,
    input_dims: Shapes,
    symbolic: set[str] | None = None,
) -> Shapes:
    """``shapes``, completed by onnx shape inference when ``mac_nodes`` lack output shapes or
    ``input_dims`` fix the graph inputs' dims (each inferred dim that is not a number counts
    as 1, as a symbolic dim does; the names of the values that have one are added to
    ``symbolic``, as ``_value_dims`` says). Inference runs on the graph alone, its large
    weights left as stand-ins: the model is not copied."""
    needs_shapes = bool(input_dims) or any(
        o.shape is None and o.name not in shapes for node in mac_nodes for o in node.outputs
    )
    if not needs_shapes:
        return shapes
    try:
        proto = large_tensors.weightless_proto(model)
        if input_dims:
            _fix_input_dims(proto.graph, input_dims)
        _standard_stand_ins(proto.graph)
        _outer_constants_into_bodies(proto.graph)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - accounting must not fail a run; MACs become a bound
        logger.debug("shape inference for MAC counting failed: %s", e)
        return shapes
    inferred_dims = _value_dims(inferred.graph, symbolic)
    if symbolic is not None:
        symbolic.difference_update(shapes)
    return {**inferred_dims, **shapes}


def _outer_constants_into_bodies(
    graph: onnx.GraphProto, outer: Mapping[str, onnx.TensorProto] | None = None
) -> None:
    """Copy, for shape inference only (``graph`` is a copy), each small constant a body
    reads from an enclosing graph into that body's initializers: onnx infers a body's shapes
    without the enclosing graph's values, so a Pad's pads or an Unsqueeze's axes lifted out
    of it (fold lifts body initializers to the main graph) left every shape after them
    unknown (Silero VAD's MACs read "≥0" after fold, every Conv of its If uncounted)."""
    known = dict(outer or {})
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:  # stand-ins hold no values
            known[tensor.name] = tensor
    for node in graph.node:
        for body in walk.proto_bodies(node):
            own = {tensor.name for tensor in body.initializer}
            read = {name for inner in body.node for name in inner.input}
            body.initializer.extend(known[name] for name in sorted(read - own) if name in known)
            _outer_constants_into_bodies(body, known)


def _standard_stand_ins(graph: onnx.GraphProto) -> None:
    """Rewrite, for shape inference only (``graph`` is a copy), onnxruntime's integer and
    block-quantized forms of MatMul and Gather into the standard op of a float stand-in
    weight (a graph input of the unpacked shape): onnx infers no shape for them, and then
    for nothing after them, so every later MatMul's rows counted once (MiniLM at 1x128:
    717M MACs read as 61M after quant, 5.3M after quant-weight)."""
    if not any(node.domain == "com.microsoft" for node in graph.node):
        return  # every model before an integer pass: nothing to rewrite, nothing to copy
    dims = {t.name: list(t.dims) for t in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        shape = _unpacked_weight_shape(node, dims) if node.domain == "com.microsoft" else None
        if shape is None:
            nodes.append(node)
            continue
        stand_in = f"onnx_shrink::stand_in_{index}"
        graph.input.append(oh.make_tensor_value_info(stand_in, onnx.TensorProto.FLOAT, shape))
        if node.op_type == "GatherBlockQuantized":
            axis = next((a.i for a in node.attribute if a.name == "gather_axis"), 0)
            nodes.append(oh.make_node("Gather", [stand_in, node.input[1]], node.output, axis=axis))
            continue
        x = node.input[0]
        if node.op_type == "MatMulIntegerToFloat":  # x is uint8 or int8
            nodes.append(oh.make_node("Cast", [x], [f"{stand_in}::x"], to=onnx.TensorProto.FLOAT))
            x = f"{stand_in}::x"
        nodes.append(oh.make_node("MatMul", [x, stand_in], node.output[:1]))
    del graph.node[:]
    graph.node.extend(nodes)


def _unpacked_weight_shape(node: onnx.NodeProto, dims: dict[str, list[int]]) -> list[int] | None:
    """The float weight shape ``_standard_stand_ins`` gives a com.microsoft node it rewrites
    ([K, N] of a MatMul form, [rows, H] of a GatherBlockQuantized table), None for others."""
    attributes = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        shape = dims.get(node.input[1]) if len(node.input) > 1 else None
        return shape if shape is not None and len(shape) == 2 else None
    if node.op_type == "MatMulNBits" and attributes.get("K") and attributes.get("N"):
        return [attributes["K"], attributes["N"]]
    if node.op_type == "GatherBlockQuantized":
        data = dims.get(node.input[0])
        bits = attributes.get("bits", 4)
        if data is None or len(data) != 2 or attributes.get("quantize_axis", 1) != 1:
            return None
        return [data[0], data[1] * 8 // bits if bits in (2, 4) else data[1]]
    return None


def _fix_input_dims(graph: onnx.GraphProto, input_dims: Shapes) -> None:
    """Give ``graph``'s inputs named in ``input_dims`` those dims, and drop the annotations
    inferred from the symbolic ones (value_info, output shapes) so that inference redoes
    them."""
    for info in graph.input:
        dims = input_dims.get(info.name)
        tensor = info.type.tensor_type
        if dims is None or not info.type.HasField("tensor_type"):
            continue
        tensor.ClearField("shape")
        for d in dims:
            tensor.shape.dim.add().dim_value = int(d)
    del graph.value_info[:]
    for info in graph.output:
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")


def _value_dims(
    graph: onnx.GraphProto, symbolic: set[str] | None = None, main: bool = True
) -> dict[str, list[int]]:
    """Dims of every typed tensor value of ``graph`` and its subgraphs, symbolic or unknown
    dims (and -1, as Paddle exports write them) as 1, the names of the values that have one
    added to ``symbolic``; values whose rank is unknown are left out."""
    result: dict[str, list[int]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor.HasField("shape"):
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
            result[info.name] = dims
            # The first axis too: with the inputs' dims fixed, a symbolic one is a dim that
            # inference lost, not the batch; it may hold a flatten's batch x sequence rows
            # (a Reshape to [-1, H] whose target inference cannot follow: 1 row counted of 6).
            # Not in a body: no run records its values, so the bound would stay for good, and
            # a Loop's iteration axis is symbolic by nature.
            dims_checked = tensor.shape.dim if main else tensor.shape.dim[1:]
            if symbolic is not None and any(d.dim_value <= 0 for d in dims_checked):
                symbolic.add(info.name)
    for node in graph.node:
        for subgraph in walk.proto_bodies(node):
            result.update(_value_dims(subgraph, symbolic, main=False))
    return result


def _exact(node: ir.Node, shapes: Shapes, symbolic: set[str]) -> bool:
    """Whether ``node_macs`` counts ``node`` on concrete dims: those of the activation its
    count rests on (a Conv's output, a ConvTranspose's input, the output or the input of a
    MatMul or Gemm by a weight, whose rows are the larger of the two, both of a MatMul of two
    activations) are known, none symbolic."""
    form = _form(node)
    assert form is not None  # a MAC node
    op, x_index = form[0], form[1]
    x = node.inputs[x_index] if len(node.inputs) > x_index else None
    out = node.outputs[0]

    def concrete(value: ir.Value | None) -> bool:
        return value is not None and value.name in shapes and value.name not in symbolic

    if op == "Conv":
        return concrete(out)
    if op in ("ConvTranspose", "Recurrent"):
        return concrete(x)
    weight = node.inputs[form[2]] if len(node.inputs) > form[2] else None
    if op == "MatMul" and (weight is None or weight.const_value is None):
        return concrete(out) and concrete(x)  # activation x activation: out times x's K
    return concrete(out) or concrete(x)


_SHAPE_KEEPING_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _dims(value: ir.Value | None, shapes: Shapes) -> list[int] | None:
    """Concrete dims of a value (from ``shapes`` first), symbolic dims as 1; None when the
    shape is unknown.

    A value that QuantizeLinear or DequantizeLinear wrote, without a shape of its own, has
    their input's: a weight behind DequantizeLinear its stored tensor's, an activation the
    float value's it quantizes (a ConvTranspose after quant read "≥" MACs, its input a
    DequantizeLinear's that inference had not reached).
    """
    if value is None:
        return None
    if value.name in shapes:
        return [int(d) for d in shapes[value.name]]
    if value.const_value is not None:
        return list(value.const_value.shape.numpy())
    if value.shape is None:
        producer = value.producer()
        if producer is not None and producer.op_type in _SHAPE_KEEPING_QDQ and producer.inputs:
            return _dims(producer.inputs[0], shapes)
        return None
    # Paddle exports write an unknown dim as -1: it counts as a symbolic one.
    return [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]


def node_macs(node: ir.Node, shapes: Shapes | None = None) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/MatMul/Gemm/LSTM/GRU/RNN node (or
    integer, QLinear or dynamically quantized form of one), or None if unknown.

    K and N come from a 2-D weight's shape (known even where shape inference fails); rows
    (output positions) whose count is unknown count once, as symbolic dims do.
    """
    form = _form(node)
    if form is None:
        return None
    op, x_index, w_index = form
    shapes = shapes or {}
    out = _dims(node.outputs[0], shapes)
    first = _dims(node.inputs[x_index], shapes)
    weight = _dims(node.inputs[w_index] if len(node.inputs) > w_index else None, shapes)
    if op == "Recurrent":
        return _recurrent_macs(node, first, weight, shapes)
    if op == "MatMulNBits":  # the MatMul of its unpacked [K, N] weight
        op, weight = "MatMul", _nbits_weight_dims(node)
    if op == "MatMul":
        if weight is not None and len(weight) == 2:  # x[..., K] @ W[K, N]: K·N per row
            # x and the output have the same rows; a symbolic dim counts as 1, so the larger
            # count is the known one. onnx infers no shape for onnxruntime's integer forms
            # (MatMulIntegerToFloat, DynamicQuantizeMatMul, MatMulNBits): their output keeps
            # the declared [batch, sequence, N] while x has the run's dims (MiniLM at 1x128
            # read 717M MACs -> 5.3M after quant).
            rows = max(math.prod(dims[:-1]) for dims in (out, first, [1]) if dims)
            return rows * weight[0] * weight[1]
        if out is None or (first is None and weight is None):
            return None
        # C[..., M, N] = A[..., M, K] @ B[..., K, N]: one MAC per output element per K.
        k = first[-1] if first else (weight[-2] if len(weight) > 1 else weight[-1])
        return math.prod(out) * k
    if op == "Gemm":
        if weight is None or len(weight) != 2:
            return None
        rows = 1
        if out is not None and len(out) == 2:
            rows = out[0]
        elif first is not None and len(first) == 2:
            rows = first[1 if node.attributes.get_int("transA", 0) else 0]
        return rows * weight[0] * weight[1]
    if op == "Conv":
        if weight is None or out is None:  # unknown positions: unknown, not one
            return None
        # Each output element sums over (Cin / group) * kernel taps: weight.shape[1:].
        return math.prod(out[:1] + out[2:]) * math.prod(weight)
    if first is None or weight is None:  # ConvTranspose: each input element feeds Cout/g·k
        return None
    return math.prod(first) * math.prod(weight[1:])


def _recurrent_macs(
    node: ir.Node, x: list[int] | None, w: list[int] | None, shapes: Shapes
) -> int | None:
    """An LSTM, GRU or RNN: every step of every sequence multiplies its input by W and its
    hidden state by R, in every direction and for every gate (W: [directions, gates x hidden,
    in], R: [directions, gates x hidden, hidden]; a DynamicQuantizeLSTM's are transposed, of
    as many elements). Steps and batch are X's first two axes in either layout."""
    r = _dims(node.inputs[2] if len(node.inputs) > 2 else None, shapes)
    if x is None or len(x) != 3 or w is None or r is None:
        return None
    return x[0] * x[1] * (math.prod(w) + math.prod(r))


def bytes_by_op_type(model: ir.Model) -> dict[str, int]:
    """Tensor bytes attributed to the op types that consume them (shared tensors counted once)."""
    seen: set[int] = set()
    result: collections.Counter[str] = collections.Counter()
    for value, tensor in walk.initializer_tensors(model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        users: Sequence[str] = sorted({use.node.op_type for use in value.uses()}) or ["(unused)"]
        result[users[0]] += tensor.nbytes
    for node, tensor in walk.constant_node_tensors(model):
        consumers = sorted({use.node.op_type for use in node.outputs[0].uses()}) or ["(unused)"]
        result[consumers[0]] += tensor.nbytes
    return dict(result.most_common())


def rising_bounds(steps: Sequence[pipeline.StepRecord]) -> str | None:
    """A note where a pass raised a lower bound on MACs, None where none did: Silero VAD's
    lossless fold read "≥177.02k → ≥548.48k", as if it had tripled the work, where it had
    given shapes to the Convs the count before left out."""
    rising = [
        f"{step.name}'s rise counts nodes whose shapes it found "
        f"({step.before.nodes_without_macs} uncounted before, {step.after.nodes_without_macs} "
        "after)"
        for step in steps
        if step.after.macs > step.before.macs
        and step.after.nodes_without_macs < step.before.nodes_without_macs
    ]
    if not rising:
        return None
    return f"≥ marks a lower bound on MACs, nodes of unknown cost left out: {'; '.join(rising)}"
