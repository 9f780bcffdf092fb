"""Value types for quantization: which tensors are float32 (what Q/DQ reads), which nodes
compute in float16/bfloat16 (left alone), and the types onnx shape inference adds for the
plan, kept or taken back when the pass ends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

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

    The annotations stay and are saved as value_info (see ``settle_inferred_types``): the
    Shape chains before a Reshape fold when onnxruntime loads the model instead of reading
    dequantized tensors.
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
    a pass which quantized nothing leaves the model as it found it (no new value_info).

    Kept, the shapes inside the graph lose the names inference invents for dimensions it
    knows nothing of (``unk__N``, also where the writer copied them or the model came with
    them); the model's own names (``batch_size``) and its outputs' shapes stay. onnxruntime
    reads two such names as one size, which lets it fuse a residual Add and its
    LayerNormalization into SkipLayerNormalization, whose CPU kernel (1.32) is the slower: 38
    us against 6 for Add + LayerNormalization on one [1, 22, 384] sentence, 449 against 67
    at [1, 128, 768]. The float model, without value_info, is not fused; MiniLM quantized
    with the names ran 1.04x the time of onnxruntime's dynamic model (fused alike), without
    them 1.00x (``benchmarks/quant_vs_ort.py``).
    """
    for value in _node_outputs(model):
        added = value.meta.pop(_INFERRED, None)
        if keep:
            # A graph output's shape is the model's interface, left as the model declares it.
            if value.shape is not None and not value.is_graph_output():
                value.shape = _without_invented_names(value.shape)
        elif added is not None:
            value.shape = None
            if added == "type":
                value.type = None


@contextlib.contextmanager
def no_inferred_annotations(model: ir.Model) -> Iterator[None]:
    """Around a tool that rebuilds ``model``'s graph and infers every shape and type on the
    way (onnx's version converter): after it, a node output of a name that had no shape, or
    no type, has none again. They would be written as value_info: a converted captcha CRNN
    whose weight-only pass quantized one 30 KB MatMul grew by 46 KB of them. By name, not by
    value (as ``infer_types``): the converter makes new values. Nothing is dropped when the
    tool raises.

    The graph outputs keep the shapes and types the model declares where the tool lost them:
    PP-OCRv5 rec's Softmax converted from opset 11 to 13 made a new output value without a
    shape, and onnx.checker rejects a graph output without one."""
    had = {
        v.name: (v.shape is not None, v.type is not None)
        for v in _node_outputs(model)
        if v.shape is None or v.type is None
    }
    declared = [(v.type, v.shape) for v in model.graph.outputs]
    yield
    for value in _node_outputs(model):
        had_shape, had_type = had.get(value.name, (True, True))
        if not had_shape:
            value.shape = None
        if not had_type:
            value.type = None
    for value, (type_, shape) in zip(model.graph.outputs, declared, strict=True):
        if value.type is None:
            value.type = type_
        if value.shape is None and shape is not None:
            value.shape = shape.copy()


INVENTED_DIM_PREFIX = "unk__"
"""How onnx shape inference names a dimension it cannot tie to a known one."""


def _without_invented_names(shape: ir.Shape) -> ir.Shape:
    invented = [
        isinstance(dim, ir.SymbolicDim) and (dim.value or "").startswith(INVENTED_DIM_PREFIX)
        for dim in shape.dims
    ]
    if not any(invented):
        return shape  # as it was, denotations included
    return ir.Shape([None if gone else dim for dim, gone in zip(shape.dims, invented, strict=True)])


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
