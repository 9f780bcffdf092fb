"""Whether an fp16 conversion is worth making on a model quantized already (``fp16``'s rule 7).

On a model whose weight bytes are mostly 4/8/16-bit integers, the conversion stores almost
no weight in the target type: it puts activations alone in float16 (an int8 T5 encoder's
RMSNorms and residual Adds), which saves no bytes, on onnxruntime's CPU no time, and cost
that encoder cosine 0.93. Such a conversion is not made unless asked (``activations_only``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

import onnx_ir as ir

from onnx_shrink.passes import fp16_islands
from onnx_shrink.passes.quant.numerics import QUANT_TYPES

logger = logging.getLogger("onnx_shrink.passes.fp16")

MIN_HALVED_SHARE = 0.1  # of all weight bytes, for a conversion to be worth making
# Weights in these are quantized (shapes and indices are int64, biases int32).
QUANTIZED_TYPES = frozenset(q.onnx for q in QUANT_TYPES.values())


def halves_weights(
    scopes: Sequence[tuple[ir.Graph, ir.Node | None]],
    new_types: Mapping[ir.Value, ir.DataType],
    target: ir.DataType,
    islands: Collection[ir.Node],
    dtype_name: str,
) -> bool:
    """Whether the planned conversion (``new_types``) stores at least ``MIN_HALVED_SHARE`` of
    the weight bytes of every graph in ``scopes`` in ``target``, or the weights are mostly
    not quantized; else a warning says why nothing changes."""
    tensors = [
        t
        for graph, _ in scopes
        for t in (
            *(v.const_value for v in graph.initializers.values()),
            *(fp16_islands.constant_tensor(n) for n in graph),
        )
        if t is not None
    ]
    total = sum(t.nbytes for t in tensors)
    quantized = sum(t.nbytes for t in tensors if t.dtype in QUANTIZED_TYPES)
    halved = sum(
        tensor.nbytes
        for value, new in new_types.items()
        if new == target and (tensor := _weight(value)) is not None
    )
    if quantized <= total / 2 or halved >= MIN_HALVED_SHARE * total:
        return True
    converted = sum(1 for graph, _ in scopes for n in graph if n not in islands and n.outputs)
    # Nothing left to convert (fold,quant,fp16 on PP-OCRv6's detector): no option to offer.
    rest = (
        f"; converting {converted} nodes' activations alone saves no bytes and costs "
        "precision (fp16.activations_only=true to do it anyway)"
        if converted
        else "; no node's activations would convert either"
    )
    logger.warning(
        "fp16: no change: only %s of the model's %s of weights would be stored in %s (its "
        "weights are quantized already)%s",
        _kib(halved),
        _kib(total),
        dtype_name,
        rest,
    )
    return False


def _weight(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor of an initializer or a Constant's output (None for an activation)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        return fp16_islands.constant_tensor(producer)
    return value.const_value if value.is_initializer() else None


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"
