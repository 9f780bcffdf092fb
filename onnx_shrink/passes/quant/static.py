"""``quant``: static QDQ quantization from calibration statistics (see ``placement`` for where)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_shrink.compiler import graph_edit, tied_weights
from onnx_shrink.compiler.data_aware import DataAwarePass, Followup, FollowupResult, Look
from onnx_shrink.compiler.options import (
    warn_unmatched,
    warn_unmatched_exclusions,
    warn_unmatched_op_types,
)
from onnx_shrink.compiler.pass_results import NotedResult
from onnx_shrink.compiler.statistics import (
    Statistics,
    StatRequest,
)
from onnx_shrink.compiler.walk import onnx_opset
from onnx_shrink.passes import half_weights
from onnx_shrink.passes.quant import (
    bias_correction,
    calibration,
    compact,
    derived,
    float_reasons,
    hard_activations,
    parameters,
    placement,
    plan_writer,
    quantized_already,
    value_types,
)
from onnx_shrink.passes.quant.static_options import StaticOptions
from onnx_shrink.passes.quant.weight_matching import ensure_opset
from onnx_shrink.passes.quant.weight_warnings import warn_half_precision
from onnx_shrink.passes.quant.without_statistics import DynamicRules

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantPass(StaticOptions, DataAwarePass):
    """Static int8 quantization: Q/DQ pairs placed where onnxruntime runs integer kernels.

    Rules:

    1. Placement follows ``placement`` (quantizable ops, fused Relu/Clip, shared scales
       through shape ops, float LayerNorm/Softmax, no quantization of mask sentinels).
    2. Activation ranges come from calibration (``calibration``: minmax, percentile, entropy
       or mse over fixed-edge histograms); activations are u8 asymmetric or s8 symmetric,
       16-bit for the tensors of nodes named in ``int16``. A Sigmoid's output range is the
       image of its input's, and an output sharing its input's scale takes the input's
       (``derived``): neither is measured. With ``dead_zones`` (u8), a tensor every reader
       maps to one value below a level (a hard-swish below -3) is quantized from that level
       up, with a grid point on it (``dead_zones``).
    3. Weights of Conv/MatMul/Gemm are s8 symmetric, per output channel unless
       ``per_channel`` is off; biases int32 with scale = input scale x weight scale; constant
       inputs of Add/Mul/Concat per tensor in the activation type. Zero points that are 0 of
       a signed type are omitted (weights of Conv and MatMul, biases).
    4. Per-channel DequantizeLinear needs opset 13: older models are converted first (their
       per-channel QDQ would otherwise be refused by onnxruntime), or fall back to per-tensor
       weights when conversion fails. 16-bit activations (``int16``) need opset 21 likewise,
       or stay 8-bit.
    5. Activations are calibrated in the main graph only; with ``subgraphs``, MatMul/Gemm
       weights inside If/Loop/Scan bodies get dynamic int8 quantization (the incumbent
       leaves them float while its file still grows); other body nodes stay float (logged).
    6. With ``gather``, constant embedding tables read by Gather are stored as int8 rows
       (``quant-dynamic``'s rule 3): no kernel runs on them in integers, but they are most of
       a transformer's bytes.
    7. Storage (``compact``): generated values get short names (``q<k>_scale``, ...), the
       QuantizeLinear node of each tensor the shortest unambiguous part of its name. With
       ``narrow_storage`` (not with ``only``), per-channel weight scales are rounded up to
       float16 values before the weights are quantized, and constants are stored in the
       narrowest type that holds them exactly (those scales as float16, position-id tables
       as int16, ...), read through a Cast that onnxruntime folds when it loads the model.
    8. With ``fused``, a quantized MatMul whose output stays float and feeds only an Add of a
       constant bias [N] becomes ``com.microsoft.MatMulIntegerToFloat`` with that bias:
       onnxruntime's QDQ fusion makes the same kernel without the bias and leaves the Add
       (on MiniLM, 15 Adds of 23; about 5 % of its latency). Off: standard ONNX QDQ only.
       An erf GELU reading a DQ becomes one Gelu node (``fuse_gelu``): ONNX's from opset 20,
       before that ``com.microsoft.Gelu`` with ``fused`` only.
    9. With ``bias_correction``, each quantized Conv's mean output drift per channel is
       subtracted from its int32 bias: its weights' and its input's rounding, from channel
       means measured on the quantized model in a second run over the calibration data (its
       first ``bias_correction_samples``; ``bias_correction``).
    10. With ``lstm``, an LSTM on constant weights becomes ``quant-dynamic``'s
        ``com.microsoft.DynamicQuantizeLSTM`` (its rule 9): onnxruntime has no QDQ LSTM
        kernel, and its own static quantizer leaves LSTMs float. With ``rnn``, GRU and RNN
        weights are stored as int8 (rule 9 too), and so are an LSTM's that the contrib op
        cannot take or ``fused=false`` keeps out: they compute in float, on weights
        onnxruntime dequantizes when it loads the model.

    11. With ``max_error``, ``shrink`` first measures each layer's sensitivity and then the
        whole pass with the worst layers kept float, more of them until the worst float
        output's relative error over the calibration data is at most ``max_error``
        (``runtime_check.accuracy_target``); the pass then runs with those layers added to
        ``exclude``.

    12. With ``hard_activations``, a HardSwish or HardSigmoid reading a Conv/MatMul/Gemm the
        pass may quantize becomes the Add, Clip and Mul onnxruntime runs on integers, its
        constant steps folded into the Convs next to it (``hard_activations``): onnxruntime
        has no integer HardSwish or HardSigmoid, and ran each in float between a
        DequantizeLinear and a QuantizeLinear.

    13. With ``float_stem``, an image model's stem stays float (``placement`` rule 10).

    14. With ``conv_transpose``, ConvTranspose weights are stored as int8 per output channel
        (``quant-dynamic``'s rule 10): onnxruntime's CPU has no integer ConvTranspose, so
        Q/DQ around one (``quantize_static``'s) only adds the activations' rounding, while
        the file still holds its float weights' bytes unless they are stored so.
    15. With ``tables``, a constant table only Slice or Reshape read (a positional encoding)
        is stored as int8 per feature the same way (``quant-dynamic``'s rule 11).

    With ``only``, rules 6, 10, 14 and 15 quantize the main-graph nodes it names, rule 5 none, rule
    12 rewrites nothing and rule 13 keeps nothing float.
    """

    name: ClassVar[str] = "quant"
    quantizes_weights: ClassVar[bool] = True  # leaves integer codes (compiler.pass_order)

    @property
    def fits_weights_to_data(self) -> bool:
        """Bias correction fits each quantized Conv's bias to the calibration data."""
        return self.bias_correction and not self.only

    @property
    def writes_qdq(self) -> bool:
        """Whether the result holds standard Q/DQ nodes at the model's opset (always):
        ``shrink`` asks onnxruntime beforehand whether it runs them there."""
        return True

    @property
    def _exclusions(self) -> placement.Exclusions:
        return placement.Exclusions(
            op_types=frozenset(self.exclude_op_types),
            nodes=self.exclude,
            only=self.only,
            activation_matmuls=self.activation_matmuls,
            sensitive=self.sensitive_ops,
            log_inputs=self.log_inputs,
            float_stem=self.float_stem,
        )

    @property
    def _ranging(self) -> parameters.Ranging:
        symmetric = self.activation_type == "s8"
        return parameters.Ranging(
            self.calibration, self.percentile, symmetric, self.dead_zones, self.int16
        )

    def requests(self, model: ir.Model) -> Sequence[StatRequest]:
        # Here, not in apply: sensitivity applies the pass once per layer on one measurement.
        if self.only and self.bias_correction:
            logger.warning("%s: bias_correction does nothing with only: it is off", self.name)
        if self.only:  # a table or LSTM it names may hold Constant weights, not yet lifted
            graph_edit.lift_constant_weights(model)
        if not self._has_candidates(model):
            self._warn_unmatched(model)
            value_types.settle_inferred_types(model, keep=False)
            return []  # and apply leaves the model as it is, opset and all
        if not self.only:  # lifted above with only
            graph_edit.lift_constant_weights(model)
        tied_weights.materialize(model)  # apply or _unchanged puts back those left float
        half_weights.lift(model)  # apply puts back those it leaves float
        # Converted (if at all) before types are inferred, as apply would: the calibration then
        # measures the graph apply plans on, and apply need not infer the types again.
        self._converted_and_typed(model)
        if self.hard_activations and not self.only:  # rule 12, on the graph measured
            self._rewrite_hard_activations(model)
        self._warn_unmatched(model)  # after rule 12: the nodes it wrote can be named
        # Only tensors that can get Q/DQ are measured: a candidate node outside that plan is
        # never accepted whatever its ranges (on PP-OCR rec: 93 of 556 candidate tensors;
        # every measured tensor costs reductions in each run, a histogram far more).
        names = placement.planned_tensors(model.graph, self._exclusions)
        # Ranges that follow from others' are computed, not measured (``derived``).
        followed = derived.sources(model.graph, names)
        names = [name for name in names if name not in followed]
        result = [StatRequest(name, "minmax") for name in names]
        if self.calibration != "minmax":
            result += [
                StatRequest(
                    name,
                    "histogram",
                    bins=self._histogram_bins,
                    per_sample=self.histogram_elements,
                    later_per_sample=self.histogram_elements_later,
                )
                for name in names
            ]
        return result

    @property
    def _histogram_bins(self) -> int:
        """``bins``, raised for entropy to the resolution its divergence needs (coarser
        histograms are resampled smooth, which favours the full range: see ``calibration``)."""
        if self.calibration == "entropy":
            return max(self.bins, calibration.ENTROPY_MIN_BINS)
        return self.bins

    def completed_statistics(self, model: ir.Model, stats: Statistics) -> Statistics:
        """``stats`` with the ranges ``requests`` left to be derived (``derived``), for the
        plan and the parameters of ``model`` as ``requests`` left it. With ``only``, where a
        range its plan reads is missing, also those the pass without it derives: sensitivity
        measures once for the whole pass and then quantizes each layer alone on those
        statistics (it completes them once: planning the whole pass for each of YOLOv8n's
        207 layers took 10 of its 110 s)."""
        planned = set(placement.planned_tensors(model.graph, self._exclusions))
        if self.only and not _ranged(stats, planned):
            whole = dataclasses.replace(self._exclusions, only=())
            planned |= set(placement.planned_tensors(model.graph, whole))
        return derived.complete(model.graph, stats, planned)

    def convert_opset(self, model: ir.Model) -> tuple[bool, bool]:
        """Convert ``model`` in place to the opset the options need (per-channel DQ: 13,
        16-bit Q/DQ: 21), as ``apply`` does before planning; (per-channel weights, 16-bit
        activations) as the model's opset then allows."""
        per_channel = self.per_channel and ensure_opset(model, 13, "per-channel weights", self.name)
        sixteen_bit = bool(self.int16) and ensure_opset(model, 21, "16-bit activations", self.name)
        return per_channel, sixteen_bit

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        if not math.isinf(self.max_error):
            logger.warning(
                "%s: max_error=%g is met by onnx_shrink.shrink(), which measures the model; "
                "bound by hand, the pass quantizes every layer exclude allows",
                self.name,
                self.max_error,
            )
        if not self._has_candidates(model):
            return self._unchanged(model)
        half_weights.lift(model)  # done by requests, unless the statistics came by hand
        tied_weights.materialize(model)  # likewise
        per_channel, sixteen_bit = self._converted_and_typed(model)
        stats = self.completed_statistics(model, stats)
        float_reasons.warn_nonfinite_inputs(model, stats)
        float_reasons.warn_overridable_constants(model)
        decided = placement.plan(model.graph, stats, self._exclusions)
        planned = set(decided.nodes)
        float_reasons.warn_unfolded_normalizations(planned)
        float_reasons.warn_few_beside_int8(model.graph, planned)
        left = placement.quantizable_nodes(model.graph, self._exclusions)
        left = [node for node in left if node not in planned]
        narrow = self.narrow_storage and not self.only
        references = {}
        if self.fits_weights_to_data:
            references = bias_correction.references(decided.nodes)
            if not references and decided.nodes:
                logger.warning("quant: bias_correction found no quantized Conv to correct")
        if decided.nodes:
            plan_writer.write_plan(
                model, decided, stats, self._ranging, per_channel, sixteen_bit, narrow, self.fused
            )
        dynamic, note = self._dynamic_rules.quantize(model, narrow)
        modified = bool(decided.nodes) or dynamic
        if not modified:
            return self._unchanged(model, decided.skipped)
        warn_half_precision(self.name, left)  # a float16 model's Convs beside its embedding
        value_types.settle_inferred_types(model, keep=True)
        common_passes.RemoveUnusedNodesPass()(model)
        float_reasons.report_subgraphs(model)
        measurement = bias_correction.Measurement(model, references)
        requests = measurement.add()
        if not requests:
            return self._finished(model, modified, narrow, note)

        def finish(result: ir.Model, seen: Statistics | None) -> None:
            measurement.finish(seen)
            self._finished(result, modified, narrow, note)

        # One sample a run: the requested means are tiny, while the measurement model holds
        # float activations (no integer kernels fuse around the means), which joined runs
        # multiply (joined, PP-OCRv4 det's took 1.6x the time and 2.3x the peak memory).
        look = Look(self.bias_correction_samples, 1, "bias correction")
        followup = Followup(model, requests, finish, look)
        return FollowupResult(model, modified, followup, note)

    def _unchanged(
        self, model: ir.Model, skipped: Mapping[str, str] | None = None
    ) -> ir.passes.PassResult:
        """Nothing quantized: say why (``float_reasons``, with the plan's ``skipped``
        reasons; float16 apart), and take back the types and shapes the pass inferred, so
        that the model is as the pass found it."""
        half_weights.restore(model)
        tied_weights.restore(model)
        reasons = float_reasons.summary(
            model.graph, self._exclusions, skipped or {}, self._dynamic_rules.float_reasons(model)
        )
        already = quantized_already.note(model.graph)
        logger.warning("quant: no node could be quantized%s%s", reasons, already)
        warn_half_precision(self.name, placement.quantizable_nodes(model.graph, self._exclusions))
        value_types.settle_inferred_types(model, keep=False)
        return ir.passes.PassResult(model, False)

    def _converted_and_typed(self, model: ir.Model) -> tuple[bool, bool]:
        """``convert_opset``, then types inferred unless they are known and the opset stayed
        (``requests``, or ``_has_candidates`` on a model that may hold float16, inferred them:
        each inference serializes the whole model)."""
        opset = onnx_opset(model)
        result = self.convert_opset(model)
        if onnx_opset(model) != opset or not value_types.types_known(model.graph):
            value_types.infer_types(model)
        return result

    def _has_candidates(self, model: ir.Model) -> bool:
        """Whether any node is of a type the options let the pass quantize: without one,
        neither ``requests`` nor ``apply`` touches the model (no opset conversion)."""
        # A node known to compute in float16 (after fp16) is no candidate: Q/DQ reads float32.
        # Types are inferred for that only where the model may hold float16 (settled later).
        candidates = placement.quantizable_nodes(model.graph, self._exclusions)
        # types_known walks every node: only where there is a candidate to settle.
        if (
            candidates
            and not value_types.types_known(model.graph)
            and value_types.may_hold_half(model)
        ):
            value_types.infer_types(model)
        if any(not value_types.computes_in_half(node) for node in candidates):
            return True
        if self.only:
            return bool(self.dynamic_layers(model))
        if self._dynamic_rules.has_candidates(model):
            return True
        return self.subgraphs and any(True for _ in model.graph.subgraphs())

    def dynamic_layers(self, model: ir.Model) -> list[ir.Node]:
        """The main-graph nodes rules 6, 10, 14 and 15 quantize without statistics (embedding
        tables, recurrent layers, ConvTranspose, tables), among ``only`` where it is given; reads
        ``model`` only. The sensitivity report measures each alone, as it does the plan's
        nodes."""
        return self._dynamic_rules.layers(model)

    @property
    def _dynamic_rules(self) -> DynamicRules:
        """Rules 5, 6, 10, 14 and 15: the weights quantized without statistics."""
        return DynamicRules(
            gather=self.gather,
            lstm=self.lstm,
            rnn=self.rnn,
            conv_transpose=self.conv_transpose,
            tables=self.tables,
            subgraphs=self.subgraphs,
            fused=self.fused,
            exclude=self.exclude,
            exclude_op_types=self.exclude_op_types,
            only=self.only,
            log_inputs=self.log_inputs,
            owner=self.name,
        )

    def _rewrite_hard_activations(self, model: ir.Model) -> None:
        """Rule 12 (``hard_activations``), where the options let the pass quantize the node
        before and do not keep the activation float."""
        exclusions = self._exclusions

        def quantizes(node: ir.Node) -> bool:  # asked of the producers alone, before any edit
            quantizable = placement.quantizable(node, exclusions)
            return quantizable and not value_types.computes_in_half(node)

        def kept(node: ir.Node) -> bool:
            return node.op_type in exclusions.op_types or placement.named(node, exclusions.nodes)

        hard_activations.rewrite(model, quantizes, kept)

    def _warn_unmatched(self, model: ir.Model) -> None:
        """A name, regex or op type of the options that names nothing is a warning."""
        warn_unmatched_exclusions(model, self.name, self.exclude)
        nodes = list(model.graph)
        names = [node.name or "" for node in nodes]
        warn_unmatched(f"{self.name}.int16", self.int16, names)
        warn_unmatched(f"{self.name}.only", self.only, names, regex=False)
        warn_unmatched_op_types(model, f"{self.name}.exclude_op_types", self.exclude_op_types)

    @staticmethod
    def _finished(model: ir.Model, modified: bool, narrow: bool, note: str) -> NotedResult:
        half_weights.restore(model)
        if modified and narrow:  # once, for all graphs, after the dead float weights are gone
            compact.store_narrow(model)
        return NotedResult(model, modified, note)


def _ranged(stats: Statistics, tensors: Sequence[str]) -> bool:
    """Whether ``stats`` hold a min/max for each of ``tensors``."""
    return all(stats.minmax(tensor) is not None for tensor in tensors)
