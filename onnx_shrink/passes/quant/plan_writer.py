"""A placement plan written into the graph: ``quant``'s Q/DQ and quantized constants."""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnx_shrink.compiler.statistics import Statistics
from onnx_shrink.passes.quant import fuse_bias, fuse_gelu, parameters, placement
from onnx_shrink.passes.quant.numerics import quant_type
from onnx_shrink.passes.quant.qdq_writer import QdqWriter

logger = logging.getLogger("onnx_shrink.passes.quant.static")


def write_plan(
    model: ir.Model,
    decided: placement.Plan,
    stats: Statistics,
    ranging: parameters.Ranging,
    per_channel: bool,
    sixteen_bit: bool,
    narrow: bool,
    fused: bool,
) -> None:
    """Q/DQ on the plan's tensors (ranges from ``stats`` as ``ranging`` sets them), its
    nodes' constants quantized, MatMul+bias pairs fused into MatMulIntegerToFloat where
    ``fused``, and GELUs after integer kernels written as one node (``fuse_gelu``)."""
    params = parameters.activation_params(model.graph, decided, stats, ranging, sixteen_bit)
    writer = QdqWriter(model.graph, narrow_storage=narrow)
    for tensor, (scale, zero) in params.items():
        writer.qdq_tensor(
            tensor,
            scale,
            zero,
            lambda node, value: placement.reads_dequantized(node, value, decided),
        )
    activation = quant_type(8, signed=ranging.symmetric)
    for node in decided.nodes:
        parameters.quantize_constants(writer, node, per_channel, activation)
    if fused:
        count = sum(fuse_bias.try_fuse(model, node) for node in decided.nodes)
        logger.info("quant: %d MatMul+bias pairs as MatMulIntegerToFloat", count)
    gelus = fuse_gelu.fuse(model, com_microsoft=fused)
    if gelus:
        logger.info("quant: %d GELUs after integer kernels as one Gelu node each", gelus)
    logger.info(
        "quant: %d nodes quantized, %d tensors with Q/DQ, %d nodes kept float",
        len(decided.nodes),
        len(params),
        len(decided.skipped),
    )
