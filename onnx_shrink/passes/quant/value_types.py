"""Value types for quantization: which tensors are float32 (what Q/DQ reads), which nodes
compute in float16/bfloat16 (left alone), and the types onnx shape inference adds for the
plan, kept or taken back when the pass ends."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

logger = logging.getLogger(__name__)

# Q/DQ reads and writes float32 only: QuantizeLinear takes float16 input from opset 19 with a
# float16 scale, which the writer does not make; a float16 model (after ``fp16``) stays as it is.
QDQ_FLOAT = ir.DataType.FLOAT
HALF_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_INFERRED = "onnx_shrink.quant.inferred_type"


def may_hold_half(model: ir.Model) -> bool:
    """Whether ``model`` holds float16/bfloat16 anywhere a cheap look finds it: an initializer,
    a graph input or a Cast to it (as ``fp16`` leaves a model)."""
    half = {int(t) for t in HALF_TYPES}
    return (
        any(v.dtype in HALF_TYPES for v in model.graph.initializers.values())
        or any(v.dtype in HALF_TYPES for v in model.graph.inputs)
        or any(
            node.op_type == "Cast" and node.attributes.get_int("to", 0) in half
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
        )
    )


def computes_in_half(node: ir.Node) -> bool:
    """Whether every non-constant input of ``node`` is known to be float16 or bfloat16 (a
    value of unknown type might be float32: not known)."""
    inputs = [v for v in node.inputs if v is not None and v.const_value is None]
    return bool(inputs) and all(v.dtype in HALF_TYPES for v in inputs)


def is_float(value: ir.Value) -> bool:
    """Known to be float32: a value of unknown type is left alone (see ``infer_types``)."""
    return value.dtype == QDQ_FLOAT


def infer_types(model: ir.Model) -> None:
    """Annotate value types with onnx shape inference so placement can tell floats apart.

    The annotations stay and are saved as value_info: onnxruntime's fusions that need shapes
    it cannot infer itself use them (on MiniLM, without them SkipLayerNormalization is not
    fused and the Shape chains before each Reshape are kept, reading dequantized tensors).
    """
    # What inference may add, to take back where nothing is quantized: a type, or a shape.
    unknown = [
        (v, v.type is not None) for v in _node_outputs(model) if v.type is None or v.shape is None
    ]
    order = {graph: list(graph.initializers) for graph in model.graphs()}
    try:
        common_passes.ShapeInferencePass(strict_mode=False)(model)
    except Exception as e:  # noqa: BLE001 - placement then quantizes only annotated floats
        logger.info("quant: shape inference failed (%s); unannotated tensors stay float", e)
    # The pass takes large initializers out while it serializes and puts them back last.
    for graph, names in order.items():
        _reorder_initializers(graph, names)
    for value, had_type in unknown:
        value.meta[_INFERRED] = "shape" if had_type else "type"


def settle_inferred_types(model: ir.Model, keep: bool) -> None:
    """End of a pass: keep the types and shapes ``infer_types`` added, or drop them, so that
    a pass which quantized nothing leaves the model as it found it (no new value_info)."""
    for value in _node_outputs(model):
        added = value.meta.pop(_INFERRED, None)
        if added is not None and not keep:
            value.shape = None
            if added == "type":
                value.type = None


def _reorder_initializers(graph: ir.Graph, names: Sequence[str]) -> None:
    """Put ``graph``'s initializers back in the order of ``names`` (others after them)."""
    held = graph.initializers.data  # the plain dict behind it: same values, new order
    ordered = {name: held[name] for name in names if name in held}
    ordered.update(held)
    held.clear()
    held.update(ordered)


def _node_outputs(model: ir.Model) -> list[ir.Value]:
    return [v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs]


def types_known(graph: ir.Graph) -> bool:
    """Every value ``graph``'s nodes produce has a known type (as after ``infer_types``)."""
    return all(value.dtype is not None for node in graph for value in node.outputs)
