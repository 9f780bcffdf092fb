"""Loop-carried values that every iteration passes through unchanged, read from outside the
Loop instead (``fold``'s helper).

tf2onnx exports a Keras LSTM as a Loop whose body receives the kernel, the recurrent kernel
and the bias as loop-carried state and hands them back unchanged each step. To every pass
that looks for constant weights they are then body inputs, not initializers: chars2vec's two
LSTMs (4.4 MiB) stayed float under quant, quant-dynamic and quant-weight, and onnxruntime
copied the carried weights every step (reading them from the outer scope made it 2.2x
faster).

Rules:

1. A Loop's carried value ``k`` (Loop input ``2 + k``, body input ``2 + k``, body output
   ``1 + k``, Loop output ``k``) is *passed through* when the body output is the body input
   itself. Its value is then the Loop's initial value in every iteration and after the last
   (with no iteration as well).
2. The body reads the initial value from the enclosing scope instead, every use of the Loop
   output ``k`` reads it too, and the carried value is removed from the Loop and its body.
3. Not where the Loop output is a graph output (a graph output cannot be renamed to another
   value), or the initial value is empty (an omitted optional input).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnx_shrink.compiler import walk

logger = logging.getLogger(__name__)


class HoistLoopInvariantsPass(ir.passes.InPlacePass):
    """Rules 1-3 of the module, on every Loop of every graph (bodies included)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        hoisted = sum(_hoist(node) for node in list(walk.all_nodes(model)) if _is_loop(node))
        if hoisted:
            logger.info("fold: %d loop-carried values read from outside their Loop", hoisted)
        return ir.passes.PassResult(model, hoisted > 0)


def _is_loop(node: ir.Node) -> bool:
    return node.op_type == "Loop" and node.domain in ("", "ai.onnx") and "body" in node.attributes


def _hoist(loop: ir.Node) -> int:
    """Hoist ``loop``'s passed-through carried values (rule 2); how many."""
    body = loop.attributes["body"].as_graph()
    if body is None or loop.graph is None:
        return 0
    carried = len(body.inputs) - 2
    dropped = [k for k in range(carried) if _passed_through(loop, body, k)]
    if not dropped:
        return 0
    for k in reversed(dropped):  # a body output cannot be replaced while it is one
        body.outputs.pop(1 + k)
    for k in dropped:
        initial = loop.inputs[2 + k]
        assert initial is not None
        body.inputs[2 + k].replace_all_uses_with(initial)
        loop.outputs[k].replace_all_uses_with(initial)
    for k in reversed(dropped):
        body.inputs.pop(2 + k)
    _rebuild(loop, [k for k in range(carried) if k not in dropped], carried)
    return len(dropped)


def _passed_through(loop: ir.Node, body: ir.Graph, k: int) -> bool:
    """Rules 1 and 3 for carried value ``k``."""
    initial = loop.inputs[2 + k] if 2 + k < len(loop.inputs) else None
    if initial is None or k >= len(loop.outputs) or loop.outputs[k].is_graph_output():
        return False
    return body.outputs[1 + k] is body.inputs[2 + k]


def _rebuild(loop: ir.Node, keep: list[int], carried: int) -> None:
    """``loop`` replaced by a Loop of the carried values in ``keep`` and the same scan
    outputs (the others' uses already moved, their body inputs and outputs gone)."""
    graph = loop.graph
    assert graph is not None
    inputs = [*loop.inputs[:2], *(loop.inputs[2 + k] for k in keep)]
    old_outputs = [loop.outputs[k] for k in keep] + list(loop.outputs[carried:])
    new_outputs = [ir.Value(name=v.name, shape=v.shape, type=v.type) for v in old_outputs]
    for value in old_outputs:
        value.name = None  # the new node's outputs take the names
    replacement = ir.Node(
        loop.domain,
        "Loop",
        inputs,
        loop.attributes.values(),
        outputs=new_outputs,
        name=loop.name,
        version=loop.version,
        doc_string=loop.doc_string,
        metadata_props=dict(loop.metadata_props),
    )
    ir.convenience.replace_nodes_and_values(
        graph, loop, [loop], [replacement], old_outputs, new_outputs
    )
