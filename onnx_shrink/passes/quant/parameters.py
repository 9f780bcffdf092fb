"""Integer parameters of a placement plan: scale and zero point of each planned activation
from its calibrated range, and the quantized constants (weights, int32 biases, constant
inputs) of each quantized node (``QuantPass`` rules 2 and 3)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.statistics import Histogram, MinMax, Statistics
from onnx_shrink.passes.quant import calibration, dead_zones, placement
from onnx_shrink.passes.quant.numerics import (
    QUANT_TYPES,
    QuantType,
    quant_type,
    scale_and_zero_point,
)
from onnx_shrink.passes.quant.qdq_writer import Params, QdqWriter

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ranging:
    """How calibrated ranges become activation parameters (``QuantPass``'s options)."""

    calibration: Literal["minmax", "percentile", "entropy", "mse"]
    percentile: float
    symmetric: bool  # s8 symmetric activations, else u8 asymmetric
    dead_zones: bool
    int16: tuple[str, ...]  # node names or regexes whose tensors get 16 bits


def activation_params(
    graph: ir.Graph,
    decided: placement.Plan,
    stats: Statistics,
    ranging: Ranging,
    sixteen_bit: bool,
) -> dict[str, Params]:
    """Scale and zero point of each planned tensor from its calibrated range (rule 2); a
    tensor sharing another's parameters (placement rule 3) gets the same arrays; the
    tensors of ``int16`` nodes get 16 bits when ``sixteen_bit`` (the opset allows it)."""
    wide = _tensors_of(decided.nodes, ranging.int16) if sixteen_bit else set()
    params: dict[str, Params] = {}
    zones = {}
    if ranging.dead_zones and not ranging.symmetric:
        zones = dead_zones.zones(graph, decided.tensors)
    sparse: list[str] = []
    for tensor in decided.tensors:
        if tensor in decided.shared:
            continue
        qtype = quant_type(16 if tensor in wide else 8, signed=ranging.symmetric)
        pick = functools.partial(_pick_range, ranging, qtype=qtype, sparse=sparse, name=tensor)
        minmax, histogram = stats.minmax(tensor), stats.histogram(tensor)
        zone = zones.get(tensor)
        if zone is not None and minmax is not None:
            lo, hi = dead_zones.chosen_range(zone, minmax, histogram, pick, qtype)
        else:
            lo, hi = pick(minmax, histogram)
        params[tensor] = scale_and_zero_point(lo, hi, qtype, ranging.symmetric)
    for tensor, source in decided.shared.items():
        if source in params:
            params[tensor] = params[source]
    if sparse:
        logger.info(
            "quant: calibration=entropy: %d tensor(s) with too few values for its KL "
            "divergence (under %d a level) get mse's range, e.g. %s",
            len(sparse),
            calibration.ENTROPY_MIN_VALUES_PER_LEVEL,
            ", ".join(sparse[:3]),
        )
    return params


def _pick_range(
    ranging: Ranging,
    minmax: MinMax,
    histogram: Histogram | None,
    qtype: QuantType,
    sparse: list[str],
    name: str,
) -> tuple[float, float]:
    """The calibration method's range for one tensor (min/max where it has no histogram;
    mse's where entropy's histogram is too sparse, ``name`` then added to ``sparse``)."""
    method = ranging.calibration if histogram is not None else "minmax"
    if method == "entropy" and calibration.too_sparse_for_entropy(
        minmax, histogram, qtype, symmetric=qtype.signed
    ):
        method = "mse"
        sparse.append(name)
    return calibration.tensor_range(
        method,
        minmax,
        histogram,
        qtype,
        symmetric=qtype.signed,
        percentile=ranging.percentile,
    )


def quantize_constants(
    writer: QdqWriter, node: ir.Node, per_channel: bool, activation: QuantType
) -> None:
    """Give ``node``'s constant inputs their DQ: a Conv/MatMul/Gemm weight s8 symmetric (per
    output channel with ``per_channel``) and its bias int32 at input scale x weight scale;
    constant data inputs of other ops per tensor in the ``activation`` type."""
    if node.op_type in placement.WEIGHTED:
        weight = node.inputs[1]
        if weight is not None and weight.const_value is not None:
            axis = placement.weight_axis(node) if per_channel else None
            x, bias = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
            x_params = writer.dequantized.get(x.name) if x is not None else None
            if bias is None or bias.const_value is None or x_params is None:
                writer.dq_weight(node, 1, QUANT_TYPES["s8"], axis)
                return
            floor = _scale_for_bias(bias.const_value.numpy(), x_params[0], axis is not None)
            w_scale = writer.dq_weight(node, 1, QUANT_TYPES["s8"], axis, floor=floor)
            writer.dq_bias(node, 2, x_params[0], w_scale)
        return
    # Only data inputs: Resize's roi and scales are constants too, and a scale of 1.0
    # read back as 1.0039 from uint8 makes every dim past 255 one longer.
    data_inputs = placement.QUANTIZABLE[node.op_type]
    for index, value in enumerate(node.inputs):
        if (
            (data_inputs is None or index in data_inputs)
            and value is not None
            and value.const_value is not None
            and np.issubdtype(value.const_value.dtype.numpy(), np.floating)
        ):
            writer.dq_weight(node, index, activation, None, symmetric=activation.signed)


def _scale_for_bias(
    bias: np.ndarray, input_scale: np.ndarray, per_channel: bool
) -> np.ndarray | None:
    """The smallest weight scale(s) at which a 1-D ``bias`` fits int32 (bias scale = input
    scale x weight scale). It binds only where a channel's weights are all (nearly) zero: their
    scale is otherwise tiny, and the bias (say a folded BatchNormalization's shift) was lost.
    The bias then takes half the int32 range, not all of it: float32 rounding of the scale
    cannot clip it, and the accumulator keeps room for the channel's (nearly zero) products."""
    if bias.ndim != 1:
        return None
    floor = np.abs(bias.astype(np.float64)) / (float(input_scale) * 2**30)
    return floor if per_channel else np.asarray(floor.max(initial=0.0))


def _tensors_of(nodes: Sequence[ir.Node], patterns: Sequence[str]) -> set[str]:
    """Activation tensors (inputs and outputs) of the quantized nodes matching ``patterns``."""
    result: set[str] = set()
    for node in nodes:
        if placement.named(node, patterns):
            result.update(v.name for v in placement.activation_inputs(node))
            result.update(o.name for o in node.outputs)
    return result
