"""Bias correction: each quantized Conv's mean output drift, taken out of its bias.

A quantized Conv's output drifts from the float one by a mean per output channel: its input
is rounded to the activation grid, systematically so where an activation clusters (a page's
background, a hard-swish's flat zero region) or is clipped, and its weights to theirs.
Subtracting that mean from the int32 bias removes the systematic part of the error for the
price of nothing at inference.

A Conv is linear, so its mean output over positions and samples is its kernel-summed weights
applied to its input's channel means, plus its bias: exactly so for a 1x1 Conv with stride 1;
for larger kernels each kernel offset's window is taken to have the whole input's mean (the
border rows and columns, and any zero padding, make the difference). With ``W`` and ``b``
the float weight and bias and ``x`` the float input, ``W~`` and ``b~`` the dequantized int8
weight and int32 bias and ``x~`` the input as the quantized model rounds it, the drift of
output channel ``c`` is::

    drift[c] = sum_k W~[c, i, k] E[x~_i] - sum_k W[c, i, k] E[x_i] + b~[c] - b[c]
                                                          (over the inputs i of c's group)

Both means are measured on the quantized model itself, ``x`` being the float tensor its
QuantizeLinear reads and ``x~`` its DequantizeLinear's output: so the drift is the Conv's
local error, not the error of every layer above it (a drift measured against the float
model's own Conv outputs carries that, and had PP-OCRv4 rec fall to no string equal to
fp32's), and what it corrects is what the quantized model computes. The measurement runs the
quantized model with two channel means beside each corrected Conv, which keep onnxruntime
from fusing those Q/DQ pairs into integer kernels: about one fp32 inference a sample. (Two
other forms were measured. The same means on the float model, ``x~`` from copies of the
Q/DQ, cost about as much, and their fidelity was within run-to-run noise of these: PP-OCRv4
rec's strings equal to fp32's 0.755/0.94/0.90 at 8/32/128 samples against 0.83/0.88/0.93,
YOLOv8n's F1 0.89/0.91/0.91 against 0.92/0.91/0.89. A float reference Conv beside each
quantized one, measuring the drift directly, border included, cost 3.6x an fp32 inference a
sample on YOLOv8n.)

It is a statistic of the quantized model, which ``quant`` measures in a second look at the
calibration data (``compiler.data_aware.Followup``):

1. ``references`` keeps, before quantization, the float weight and bias of every Conv that
   gets an int32 bias.
2. ``Measurement.add`` puts beside each such Conv of the quantized model the per-sample
   channel means (``GlobalAveragePool``) of ``x`` and ``x~``, whose ``channel_sum`` over
   samples is requested.
3. ``Measurement.finish`` removes what ``add`` put in the graph and subtracts each drift, in
   units of the bias's scale (input scale x weight scale), from the int32 bias.

Measured by ``benchmarks/quant_vs_ort.py`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.compiler.statistics import ChannelValues, Statistics, StatRequest
from onnx_shrink.passes.quant import numerics

logger = logging.getLogger(__name__)

INT32 = np.iinfo(np.int32)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A Conv's float weight and bias, as they were before quantization."""

    weight: np.ndarray
    bias: np.ndarray


def references(nodes: Iterable[ir.Node]) -> dict[ir.Node, Reference]:
    """The float weight and 1-D bias of every Conv in ``nodes`` with constant ones (taken
    before the pass replaces them by their quantized copies)."""
    result = {}
    for node in nodes:
        if node.op_type != "Conv" or len(node.inputs) < 3:
            continue
        weight, bias = node.inputs[1], node.inputs[2]
        if weight is None or bias is None:
            continue
        if weight.const_value is None or bias.const_value is None:
            continue
        bias_array = bias.const_value.numpy()
        if bias_array.ndim == 1:
            result[node] = Reference(weight.const_value.numpy(), bias_array)
    return result


@dataclasses.dataclass(frozen=True)
class _Corrected:
    """A quantized Conv with what its correction needs from the quantized graph."""

    conv: ir.Node
    quantize: ir.Node
    """the QuantizeLinear whose DequantizeLinear the Conv reads"""
    dequantize: ir.Node
    bias: ir.Value
    """the int32 initializer its bias's DequantizeLinear reads"""
    bias_scale: np.ndarray
    weight: np.ndarray
    """the weight the quantized Conv computes with (dequantized), float64"""
    reference: Reference


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _dequantized(dq: ir.Node | None, ndim: int) -> np.ndarray | None:
    """A constant DequantizeLinear's output (per-tensor or per-axis), float64."""
    if dq is None or len(dq.inputs) < 2 or "block_size" in dq.attributes:
        return None
    stored, scale = _constant(dq.inputs[0]), _constant(dq.inputs[1])
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if stored is None or scale is None or stored.ndim != ndim:
        return None
    axis = dq.attributes.get_int("axis", 1) % ndim
    zero = np.zeros((), stored.dtype) if zero is None else zero
    return numerics.dequantize(stored, scale, zero, axis).astype(np.float64)


def _int32_bias(value: ir.Value | None) -> tuple[ir.Value, np.ndarray] | None:
    """(the int32 initializer, its scale) when ``value`` is DequantizeLinear of one."""
    dq = _producer(value, "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2:
        return None
    stored, scale = dq.inputs[0], _constant(dq.inputs[1])
    if stored is None or scale is None or stored.const_value is None:
        return None
    if stored.const_value.dtype != ir.DataType.INT32:
        return None
    return stored, scale.astype(np.float64)


def _corrected(refs: Mapping[ir.Node, Reference]) -> list[_Corrected]:
    """The Convs of ``refs`` that quantization left reading a Q/DQ'd activation, with a
    dequantized constant weight and an int32 bias that no other node reads."""
    result = []
    for conv, reference in refs.items():
        if conv.graph is None or len(conv.inputs) < 3:
            continue
        dq = _producer(conv.inputs[0], "DequantizeLinear")
        q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
        bias = _int32_bias(conv.inputs[2])
        weight = _dequantized(_producer(conv.inputs[1], "DequantizeLinear"), reference.weight.ndim)
        if q is None or bias is None or weight is None or len(bias[0].uses()) != 1:
            continue
        if weight.shape != reference.weight.shape:
            continue
        stored, scale = bias
        result.append(_Corrected(conv, q, dq, stored, scale, weight, reference))
    return result


class Measurement:
    """The channel means ``add`` puts in a quantized graph, the requests that measure them,
    and ``finish``, which takes them out and corrects the biases."""

    def __init__(self, model: ir.Model, refs: Mapping[ir.Node, Reference]) -> None:
        self.model = model
        self.corrected = _corrected(refs)
        self.nodes: list[ir.Node] = []
        self.means: list[tuple[str, str]] = []
        """(mean of ``x``, mean of ``x~``) for each of ``corrected``"""

    def add(self) -> tuple[StatRequest, ...]:
        """Put the channel means in the graph; the requests that measure them."""
        if not self.corrected:  # nothing to measure: the graph is not walked
            return ()
        graph = self.model.graph
        taken = graph_edit.value_names(graph)
        names: dict[ir.Value, str] = {}  # one mean a tensor, however many Convs read it
        for item in self.corrected:
            pair = (item.quantize.inputs[0], item.dequantize.outputs[0])
            for value in pair:
                if value not in names:
                    names[value] = self._mean(graph, value, taken)
            self.means.append((names[pair[0]], names[pair[1]]))
        return tuple(StatRequest(name, "channel_sum", axis=1) for name in names.values())

    def _mean(self, graph: ir.Graph, value: ir.Value, taken: set[str]) -> str:
        """A per-sample channel mean of ``value`` ([N, C, 1, ...]) at the end of ``graph``."""
        name = graph_edit.fresh_name(f"{value.name}::channel_mean", taken)
        node = ir.node("GlobalAveragePool", [value], outputs=[ir.Value(name=name)])
        node.outputs[0].dtype = ir.DataType.FLOAT
        graph.append(node)
        self.nodes.append(node)
        return name

    def remove(self) -> None:
        """Take out of the graph everything ``add`` put in."""
        for node in reversed(self.nodes):
            self.model.graph.remove(node, safe=True)
        self.nodes = []

    def finish(self, stats: Statistics | None) -> int:
        """Remove the means and correct every bias from them (none without ``stats``);
        returns how many biases changed."""
        self.remove()
        if stats is None:
            return 0
        changed = 0
        for item, names in zip(self.corrected, self.means, strict=True):
            means = [stats.get(name, "channel_sum", axis=1) for name in names]
            if not all(isinstance(m, ChannelValues) and m.rows > 0 for m in means):
                continue
            float_mean, rounded_mean = (m.values / m.rows for m in means)
            groups = item.conv.attributes.get_int("group", 1)
            if float_mean.size != groups * item.weight.shape[1]:  # not the Conv's channels
                continue
            drift = _output_means(item.weight, rounded_mean, groups) - _output_means(
                item.reference.weight.astype(np.float64), float_mean, groups
            )
            stored = item.bias.const_value.numpy().astype(np.int64)
            drift += stored * item.bias_scale - item.reference.bias.astype(np.float64)
            step = np.round(drift / item.bias_scale)
            if not np.all(np.isfinite(step)):
                continue
            new = np.clip(stored - step.astype(np.int64), INT32.min, INT32.max).astype(np.int32)
            if np.array_equal(new, stored):
                continue
            item.bias.const_value = ir.tensor(new, name=item.bias.name)
            changed += 1
        logger.info("quant: bias correction changed %d of %d biases", changed, len(self.corrected))
        return changed


def _output_means(weight: np.ndarray, input_means: np.ndarray, groups: int) -> np.ndarray:
    """A Conv's mean output per channel, bias left out, from its input's channel means
    (each kernel offset's window taken to have the whole input's mean)."""
    outputs, per_group = weight.shape[:2]
    summed = weight.sum(axis=tuple(range(2, weight.ndim))).reshape(groups, -1, per_group)
    return np.einsum("gop,gp->go", summed, input_means.reshape(groups, per_group)).reshape(outputs)
