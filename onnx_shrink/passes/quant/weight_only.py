"""Block-wise int4/int8 weight-only quantization of MatMul and Gather weights (LLM-style models).

A weight is cut into blocks of ``B`` values along its reduction axis (K of a MatMul weight
[K, N], the embedding dimension H of a table [V, H]); block ``b`` has its own scale and zero
point: ``W[k, n] ~ (q[k, n] - z[k // B, n]) * s[k // B, n]`` (``blockwise``). Activations stay
float: the kernel dequantizes blocks on the fly, so only the weight bytes shrink (to about
``bits / 32`` plus one float32 scale per block: ``32 / B`` bits per weight).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, tied_weights
from onnx_shrink.compiler.data_aware import DataAwarePass
from onnx_shrink.compiler.options import check_options, option, warn_unmatched_exclusions
from onnx_shrink.compiler.statistics import Statistics, StatRequest
from onnx_shrink.compiler.walk import onnx_opset
from onnx_shrink.passes import half_weights
from onnx_shrink.passes.quant import gptq_grams, log_cone
from onnx_shrink.passes.quant.blockwise import (
    BlockQuantized,
    pack_low_first,
    quantize_blocks,
    quantize_blocks_gptq,
)
from onnx_shrink.passes.quant.weight_matching import (
    MS_DOMAIN,
    Arrays,
    LinearMatch,
    WeightContext,
    check_selection,
    derived_name,
    ensure_opset,
    gather_reason,
    match_linear,
    trimmed,
)
from onnx_shrink.passes.quant.weight_warnings import (
    half_precision_left,
    warn_float_convs,
    warn_left_to_others,
    warn_tables_in_8_bits,
)

logger = logging.getLogger(__name__)

SUPPORTED_OPS = ("MatMul", "Gather")
FORMATS = ("matmulnbits", "dequantize_linear")
# Blocked DequantizeLinear (``block_size``) and int4 types exist from opset 21 / IR 10 on.
BLOCKED_DQ_OPSET = 21
INT4_IR_VERSION = 10
ORT_FUSED_LEVEL = 4
"""The accuracy level onnxruntime gives the MatMulNBits it fuses from a DequantizeLinear before
a MatMul, unless its session sets session.qdq_matmulnbits_accuracy_level: the file has no
place for one, so format=dequantize_linear takes only this one."""
FUSED_DEQUANTIZE_HARM = (
    "onnxruntime fuses DequantizeLinear and MatMul into MatMulNBits with int8 activations "
    "unless its session sets session.qdq_matmulnbits_accuracy_level: onnx-asr's NeMo front "
    "end gave NaN for 28% of its features; format=matmulnbits computes it in fp32"
)
"""Why a MatMul before a Log keeps its float weight with ``format=dequantize_linear``."""


@dataclasses.dataclass(frozen=True)
class WeightOnlyQuantPass(DataAwarePass):
    """Quantize constant MatMul and Gather weights block-wise to ``bits``. Activations stay
    float in the file; MatMulNBits' ``accuracy_level`` 4 (the default) has onnxruntime's CPU
    provider quantize them to int8 per block at run time (fastest; on openWakeWord's mel
    filterbank, a power spectrum up to ~1e10, SNR 20.6 dB against 48.7 dB at level 1). A
    MatMul whose output reaches a Log through linear ops (``log_cone``) gets level 1 and
    8-bit codes unless ``log_inputs`` (``_guards_log``).

    Rules:

    1. ``MatMul(A, W)``, ``W`` a 2-D float32 initializer [K, N], with ``format=matmulnbits``
       becomes ``com.microsoft.MatMulNBits(A, B, scales[, zero_points][, bias])``, attributes
       K, N, bits, block_size (and accuracy_level when set): ``B`` [N, n_blocks, B * bits / 8]
       holds the codes of ``W^T`` packed low bits first, ``scales`` is [N, n_blocks],
       ``n_blocks = ceil(K / B)``; K is zero-padded to ``n_blocks * B``. A following
       ``Add(Y, b)`` with a constant ``b`` of shape [N] becomes the ``bias`` input.
    2. ``Gather(W, ids, axis=0)`` of a table [V, H] becomes ``com.microsoft.
       GatherBlockQuantized(data, ids, scales[, zero_points])`` with blocks along H
       (``quantize_axis=1``): ``data`` is uint8 [V, ceil(H * bits / 8)], packed the same way.
    3. ``format=dequantize_linear`` writes standard ONNX and needs opset >= 21: an older
       model is converted first, as ``quant`` converts for its Q/DQ (the pass fails, naming
       the converter's error, when it cannot be):
       ``MatMul(A, DequantizeLinear(Wq, s, axis=0, block_size=B))`` with ``Wq`` int4/int8
       [K, N] and ``s`` [n_blocks, N] (onnxruntime fuses it into MatMulNBits at load), and
       ``DequantizeLinear(Gather(Wq, ids), Gather(s, ids), axis=-1, block_size=B)`` for
       tables. ONNX Gather cannot read int4, and dequantizing a whole table before the
       Gather costs every run more than the model itself, so tables get 8-bit codes here.
    4. ``symmetric``: signed codes, no zero point (packed formats store ``q + 2^(bits-1)``,
       their default zero point); per block, of the grid centred on 0 (``[-7, 7]`` for 4
       bits) and the grid whose every code is used (the block's extreme at -8, the scale's
       sign its opposite), the one that leaves the smaller error (``blockwise``). Otherwise
       unsigned codes with a zero point per block.
    5. Skipped, with a debug log, like quant-dynamic: excluded names, weights that are not
       float32 initializers or are graph inputs, weights under ``min_weight_elements``, and
       model-local functions. Shared weights are quantized once; the float weight stays while
       anything still reads it. If/Loop/Scan bodies are rewritten too.
    6. ``rounding=gptq`` (calibration data needed; the pass is data-free otherwise): each
       main-graph MatMul's codes are chosen by GPTQ (``gptq``) from the Gram of its input on
       the calibration data, on the grid nearest rounding would use (same scales and zero
       points, so the same bytes and kernels). A weight several MatMuls read is rounded for
       the sum of their Grams. Gather tables, MatMuls in bodies or of constant inputs, inputs
       wider than ``gptq.MAX_COLUMNS`` and Grams past ``gram_memory_mb`` keep nearest
       rounding (said in a warning); ``ranges`` applies to either rounding.
    """

    name: ClassVar[str] = "quant-weight"
    quantizes_weights: ClassVar[bool] = True  # leaves integer codes (compiler.pass_order)

    bits: int = option(4, "bits per weight", choices=(4, 8))
    block_size: int = option(
        32, "weights per scale along the reduction axis", choices=(16, 32, 64, 128, 256)
    )
    symmetric: bool = option(True, "signed codes, no zero points")
    format: Literal["matmulnbits", "dequantize_linear"] = option(
        "matmulnbits",
        "matmulnbits: com.microsoft MatMulNBits/GatherBlockQuantized; dequantize_linear: "
        "opset-21 blocked DequantizeLinear before the float MatMul/Gather (Gather tables in 8 "
        "bits: ONNX Gather reads no int4)",
        choices=FORMATS,
    )
    accuracy_level: int = option(
        4,
        "MatMulNBits compute type: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations"
        " quantized per block at run time (fastest on CPU; ignored by GPU providers); "
        "format=matmulnbits only, as dequantize_linear leaves it to onnxruntime's session (4)",
        choices=(0, 1, 2, 3, 4),
    )
    log_inputs: bool = option(
        False,
        "quantize MatMuls whose output reaches a Log through linear ops (a log-mel "
        "filterbank) like the others: by default they get 8-bit codes and fp32 compute "
        "(accuracy_level 1), since 4-bit weights and run-time int8 activations erase the "
        "small values a Log spreads out",
    )
    op_types: tuple[str, ...] = option(
        SUPPORTED_OPS, f"op types to quantize, of {', '.join(SUPPORTED_OPS)}"
    )
    exclude: tuple[str, ...] = option(
        (), "node names or regular expressions (full match) to leave in float", patterns=True
    )
    min_weight_elements: int = option(4096, "weights with fewer elements stay float", minimum=0)
    rounding: Literal["nearest", "gptq"] = option(
        "nearest",
        "how MatMul weights take their codes: nearest (no data needed), or gptq (each "
        "layer's rounding errors compensated from the Gram of its calibration inputs; same "
        "grid, size and speed)",
        choices=("nearest", "gptq"),
    )
    ranges: Literal["minmax", "mse"] = option(
        "minmax",
        "each block's range: its min/max, or that range shrunk by the factor (0.6-1.0) whose "
        "codes leave the least squared error in the block (no data needed; slower to convert)",
        choices=("minmax", "mse"),
    )
    gram_memory_mb: int = option(
        2048,
        "gptq holds one float64 Gram (K x K) per MatMul input at once: MatMuls past this many "
        "MiB of them, widest last, keep nearest rounding",
        minimum=0,
    )

    @property
    def fits_weights_to_data(self) -> bool:
        """gptq picks each MatMul's codes from its calibration inputs."""
        return self.rounding == "gptq"

    @property
    def writes_qdq(self) -> bool:
        """Whether the result holds standard Q/DQ nodes at the model's opset
        (format=dequantize_linear): ``shrink`` asks onnxruntime beforehand whether it runs
        them there."""
        return self.format == "dequantize_linear"

    def __post_init__(self) -> None:
        check_options(self)
        check_selection(self.op_types, SUPPORTED_OPS)
        if self.format == "dequantize_linear" and self.accuracy_level != ORT_FUSED_LEVEL:
            raise ValueError(
                f"accuracy_level={self.accuracy_level} cannot be written with "
                "format=dequantize_linear: onnxruntime fuses DequantizeLinear and MatMul into "
                "MatMulNBits at the level of its session option "
                f"session.qdq_matmulnbits_accuracy_level ({ORT_FUSED_LEVEL} unless the session "
                "sets it); use format=matmulnbits"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Without data (``rounding=nearest``) the pass runs like any in-place pass."""
        if self.rounding == "gptq":
            return super().call(model)  # says how to give it statistics
        return self.apply(model, Statistics({}, 0, "none needed"))

    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        """With ``rounding=gptq``, the Gram of each main-graph MatMul's activation (its
        quantized weight's rows run along K)."""
        if self.rounding != "gptq":
            return []
        if "MatMul" not in self.op_types:
            logger.warning(
                "%s: rounding=gptq picks MatMul codes only; op_types has none", self.name
            )
            return []
        self._prepare(model)
        context = WeightContext.of(
            model, self.name, self.exclude, self.min_weight_elements, quiet=True
        )
        return gptq_grams.gram_requests(context, self._matmuls(model, context), self.gram_memory_mb)

    def _matmuls(self, model: ir.Model, context: WeightContext) -> list[ir.Node]:
        """The main-graph MatMuls the pass may quantize: the statistics engine measures the
        main graph only, so a MatMul in an If/Loop/Scan body keeps nearest rounding."""
        if "MatMul" not in self.op_types:
            return []
        return [n for n in context.candidates(("MatMul",)) if n.graph is model.graph]

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        warn_unmatched_exclusions(model, self.name, self.exclude)
        lifted = self._prepare(model)
        context = WeightContext.of(model, self.name, self.exclude, self.min_weight_elements)
        grams: dict[ir.Value, np.ndarray] = {}
        if self.rounding == "gptq":  # nearest rounding has no Grams to look for
            grams = gptq_grams.weight_grams(context, self._matmuls(model, context), stats)
        count = tables = 0
        for node in context.candidates(self.op_types):
            if node.op_type == "Gather":
                tables += self._try_quantize_gather(context, node)
            else:
                count += self._try_quantize_matmul(context, node, grams)
        count += tables
        if count and self.format == "dequantize_linear":
            model.ir_version = max(model.ir_version, INT4_IR_VERSION)
        if tables and self.format == "dequantize_linear" and self.bits < 8:
            warn_tables_in_8_bits(self.name, tables, self.bits)
        context.drop_dead_weights()
        half_weights.restore(model)  # those left float
        logger.info("%s: quantized %d nodes", self.name, count)
        if not count:
            context.warn_nothing_quantized(self.op_types)
        else:
            warn_float_convs(model, self.name)
            half_precision_left(model, self.name, self.op_types)
        warn_left_to_others(model, self.name)
        return ir.passes.PassResult(model, count > 0 or lifted)

    def _prepare(self, model: ir.Model) -> bool:
        """Lift Constant weights to initializers and, for ``format=dequantize_linear``,
        convert the opset; returns whether any weight was lifted."""
        opset = onnx_opset(model)
        lifted = graph_edit.lift_constant_weights(model, read_by=self.op_types)
        lifted |= tied_weights.materialize(model)  # drop_dead_weights puts back those left float
        half_weights.lift(model)  # apply puts back those it leaves float
        # Converted only for weights it will quantize: a model without any keeps its opset.
        if (
            self.format == "dequantize_linear"
            and opset < BLOCKED_DQ_OPSET  # else nothing to convert: no need to look
            and self._has_weights(model)
            and not ensure_opset(model, BLOCKED_DQ_OPSET, "blocked DequantizeLinear", self.name)
        ):
            raise ir.passes.PreconditionError(
                f"{self.name}: format=dequantize_linear needs opset >= {BLOCKED_DQ_OPSET} "
                f"(blocked DequantizeLinear), and the model's opset {opset} could not be "
                "converted (see the warning above); use format=matmulnbits"
            )
        return lifted

    def _has_weights(self, model: ir.Model) -> bool:
        """Whether any candidate node has a weight this pass would quantize."""
        context = WeightContext.of(
            model, self.name, self.exclude, self.min_weight_elements, quiet=True
        )
        return any(
            gather_reason(context, node) is None
            if node.op_type == "Gather"
            else not isinstance(self._matmul_match(context, node), str)
            for node in context.candidates(self.op_types)
        )

    def _blocks(
        self,
        rows: np.ndarray,
        bits: int | None = None,
        gram: np.ndarray | None = None,
        weight_name: str = "",
    ) -> BlockQuantized:
        """``rows`` quantized in blocks along their last axis: with ``gram`` (of the inputs
        those rows multiply), GPTQ's codes, else the nearest ones."""
        grid = {
            "bits": bits or self.bits,
            "block_size": self.block_size,
            "mse": self.ranges == "mse",
        }
        if gram is not None:
            try:
                return quantize_blocks_gptq(rows, gram, **grid, symmetric=self.symmetric)
            except np.linalg.LinAlgError as e:
                logger.info("%s: %s keeps nearest rounding: %s", self.name, weight_name, e)
        return quantize_blocks(rows, **grid, symmetric=self.symmetric)

    def _key(self, kind: str, bits: int | None = None) -> tuple[str, int, int, bool, str]:
        return (kind, bits or self.bits, self.block_size, self.symmetric, self.ranges)

    def _try_quantize_matmul(
        self, context: WeightContext, node: ir.Node, grams: Mapping[ir.Value, np.ndarray]
    ) -> bool:
        match = self._matmul_match(context, node)
        if isinstance(match, str):
            return context.skip(node, match)
        gram = grams.get(match.weight)
        guards_log = self._guards_log(node)
        bits = 8 if guards_log else self.bits
        if self.format == "dequantize_linear":
            self._dequantize_before_matmul(context, node, match.weight, gram, bits)
            return True
        packed, scales, zero_points = context.weights(
            match.weight,
            self._key("nbits", bits),
            functools.partial(self._packed_columns, gram=gram, name=match.weight.name, bits=bits),
        )
        assert match.weight.const_value is not None
        k, n = match.weight.const_value.shape
        attributes = {"K": k, "N": n, "bits": bits, "block_size": self.block_size}
        if self.accuracy_level:
            attributes["accuracy_level"] = 1 if guards_log else self.accuracy_level
        bias = context.constant(node, "bias", match.bias)
        nbits = ir.node(
            "MatMulNBits",
            trimmed(match.activation, packed, scales, zero_points, None, bias),
            attributes,
            domain=MS_DOMAIN,
            name=derived_name(node, f"q{bits}"),
        )
        context.replace(match.replaced, [nbits])
        return True

    def _matmul_match(self, context: WeightContext, node: ir.Node) -> LinearMatch | str:
        """``match_linear``'s, or why a MatMul whose output reaches a Log stays float with
        ``format=dequantize_linear``: onnxruntime fuses any DequantizeLinear before a MatMul
        into MatMulNBits at the accuracy level of its session option (4, int8 activations,
        unless the session sets it), which the file cannot change."""
        match = match_linear(context, node)
        if (
            isinstance(match, str)
            or self.format != "dequantize_linear"
            or self.log_inputs
            or not log_cone.feeds_log(node)
        ):
            return match
        return log_cone.reason(self.name, FUSED_DEQUANTIZE_HARM)

    def _guards_log(self, node: ir.Node) -> bool:
        """Whether ``node``'s output reaches a Log (``log_cone``) and, unless ``log_inputs``,
        gets 8-bit codes and fp32 compute (accuracy_level 1, where it was 2-4): level 4's
        run-time int8 activations and 4-bit weights both erase the quiet bins a Log spreads
        out (and float16's subnormals, level 2's). On openWakeWord's mel model the output's
        relative error was 0.165 with 4-bit codes at level 4, 0.0075 at level 1, 0.0004 with
        8-bit codes at level 1; on onnx-asr's NeMo front end 0.045 with 4-bit codes at level
        1, 0.0018 with 8-bit ones. The 8-bit filterbanks cost 4.5 and 18 KiB more, in files
        of 1 MiB. False with ``format=dequantize_linear``: ``_matmul_match`` keeps such a
        MatMul float there, and the cone is not walked again."""
        if self.log_inputs or self.format == "dequantize_linear" or not log_cone.feeds_log(node):
            return False
        changes = [
            *(["8-bit codes"] if self.bits < 8 else []),
            *(["fp32 compute"] if self.accuracy_level > 1 else []),
        ]
        if changes:
            logger.info(
                "%s: %s gets %s: its output reaches a Log",
                self.name,
                node.name,
                " and ".join(changes),
            )
        return True

    def _packed_columns(
        self, w: np.ndarray, gram: np.ndarray | None = None, name: str = "", bits: int = 4
    ) -> Arrays:
        """MatMulNBits inputs of ``W`` [K, N]: blocks run along K within each column of W."""
        blocks = self._blocks(w.T, bits=bits, gram=gram, weight_name=name)
        return {
            f"q{bits}": pack_low_first(blocks.unsigned_codes(), bits),
            "scales": blocks.scales,
            "zero_points": None if self.symmetric else pack_low_first(blocks.zero_points, bits),
        }

    def _dequantize_before_matmul(
        self,
        context: WeightContext,
        node: ir.Node,
        weight: ir.Value,
        gram: np.ndarray | None,
        bits: int,
    ) -> None:
        """``MatMul(A, W)`` -> ``MatMul(A, DequantizeLinear(Wq, s[, z], axis=0, block_size))``."""

        def quantize(w: np.ndarray) -> Arrays:
            blocks = self._blocks(w.T, bits=bits, gram=gram, weight_name=weight.name or "")
            return {
                f"q{bits}": _typed(blocks.values().T, blocks),
                "scales": np.ascontiguousarray(blocks.scales.T),
                "zero_points": None if self.symmetric else _typed(blocks.zero_points.T, blocks),
            }

        codes, scales, zero_points = context.weights(weight, self._key("blocked-k", bits), quantize)
        dequantize = ir.node(
            "DequantizeLinear",
            trimmed(codes, scales, zero_points),
            {"axis": 0, "block_size": self.block_size},
            name=derived_name(node, "dequant"),
        )
        context.read_dequantized(node, dequantize)

    def _try_quantize_gather(self, context: WeightContext, node: ir.Node) -> bool:
        reason = gather_reason(context, node)
        if reason is not None:
            return context.skip(node, reason)
        table, ids = node.inputs[0], node.inputs[1]
        assert table is not None and ids is not None
        if self.format == "dequantize_linear":
            context.replace([node], self._gather_then_dequantize(context, node, table, ids))
            return True
        width = table.const_value.shape[1] if table.const_value is not None else 0
        if self.bits == 4 and width % 2:
            # GatherBlockQuantized reads two codes per byte and a row's width from its bytes:
            # an odd width would come back one column wider.
            return context.skip(node, f"4-bit rows of odd width {width} cannot be packed")
        data, scales, zero_points = context.weights(
            table, self._key("nbits-rows"), self._packed_rows
        )
        attributes = {
            "bits": self.bits,
            "block_size": self.block_size,
            "gather_axis": 0,
            "quantize_axis": 1,
        }
        gather = ir.node(
            "GatherBlockQuantized",
            trimmed(data, ids, scales, zero_points),
            attributes,
            domain=MS_DOMAIN,
            name=derived_name(node, f"q{self.bits}"),
        )
        context.replace([node], [gather])
        return True

    def _packed_rows(self, w: np.ndarray) -> Arrays:
        """GatherBlockQuantized inputs of a table [V, H]: blocks run along H within each row."""
        blocks = self._blocks(w)
        return {
            f"q{self.bits}": pack_low_first(
                blocks.unsigned_codes().reshape(len(w), -1)[:, : w.shape[1]], self.bits
            ),
            "scales": blocks.scales,
            "zero_points": None
            if self.symmetric
            else pack_low_first(blocks.zero_points, self.bits),
        }

    def _gather_then_dequantize(
        self, context: WeightContext, node: ir.Node, table: ir.Value, ids: ir.Value
    ) -> list[ir.Node]:
        """``DequantizeLinear(Gather(Wq, ids), Gather(s, ids)[, Gather(z, ids)])``, 8-bit codes."""

        def quantize(w: np.ndarray) -> Arrays:
            blocks = self._blocks(w, bits=8)
            return {
                "q8": blocks.values(),
                "scales": blocks.scales,
                "zero_points": None if self.symmetric else blocks.zero_points,
            }

        key = ("blocked-rows", 8, self.block_size, self.symmetric)
        gathers = [
            ir.node("Gather", [value, ids], {"axis": 0}, name=derived_name(node, f"gather_{i}"))
            for i, value in enumerate(context.weights(table, key, quantize))
            if value is not None
        ]
        dequantize = ir.node(
            "DequantizeLinear",
            [g.outputs[0] for g in gathers],
            {"axis": -1, "block_size": self.block_size},
            name=derived_name(node, "dequant"),
        )
        return [*gathers, dequantize]


def _typed(codes: np.ndarray, blocks: BlockQuantized) -> ir.Tensor:
    """Codes as a tensor of the block's ONNX type (int4/uint4 are packed on serialization)."""
    return ir.Tensor(np.ascontiguousarray(codes), dtype=blocks.qtype.onnx)
