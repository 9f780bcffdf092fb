"""Ranges the quant pass computes from other tensors' instead of measuring them.

* A Sigmoid's output ranges over ``[sigmoid(min x), sigmoid(max x)]`` of its input ``x``:
  sigmoid is increasing, so those are exactly the output's extremes.
* An output that shares its input's scale (placement rule 3: shape ops, MaxPool, Resize,
  Split) holds a selection, repetition or interpolation of its input's values: the input's
  range holds it, and the output is quantized with the input's parameters anyway.

Measuring them costs more than their reductions: a Sigmoid output with a second reader
keeps onnxruntime from fusing ``x * Sigmoid(x)`` into one kernel in the calibration graph,
and each reduction of it needs the Conv's blocked (NCHWc) layout converted back. On YOLOv8n
(57 SiLUs) a calibration run of 8 samples took 234-247 ms with them measured, 140-152
without (onnxruntime's profile, two threads).

Sigmoid outputs then get min/max ranges whatever the calibration method. Within [0, 1] a
uint8 step is 1/255 and an MSE clip has little to gain: YOLOv8n's detections F1 against
fp32 moved 0.828 -> 0.820 at 32 samples and 0.825 -> 0.813 at 128 (of about 50
detections), its score correlation 0.939 -> 0.945 and 0.949 -> 0.949; PP-OCRv4 rec's
strings equal to fp32's 0.375 -> 0.380 and 0.865 -> 0.855 (of 200 lines).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection

import onnx_ir as ir

from onnx_shrink.compiler.statistics import MinMax, Statistics, StatRequest
from onnx_shrink.passes.quant import placement

INCREASING = {"Sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0}
"""Elementwise increasing functions by op type: the output's range is the image of the
input's."""


def sources(graph: ir.Graph, tensors: Collection[str]) -> dict[str, str]:
    """Which of ``tensors`` follow from another of them: derived tensor -> the tensor its
    range comes from (itself measured, or derived earlier in graph order)."""
    wanted = frozenset(tensors)
    shared = placement.shared_scale_sources(graph, wanted)
    result: dict[str, str] = {}
    for node in graph:  # graph order: a tensor's source is resolved before it
        if node.op_type in INCREASING and node.inputs and node.inputs[0] is not None:
            out, source = node.outputs[0], node.inputs[0].name
            if source in wanted and out is not None and out.name in wanted:
                result[out.name] = source
            continue
        result.update(
            (o.name, shared[o.name]) for o in node.outputs if o is not None and o.name in shared
        )
    return result


def complete(graph: ir.Graph, stats: Statistics, tensors: Collection[str]) -> Statistics:
    """``stats`` with a min/max for each of ``tensors`` that ``sources`` derives and that has
    none of its own (one measured stays as it is)."""
    producers = {out.name: node for node in graph for out in node.outputs if out is not None}
    added: dict[str, MinMax] = {}
    for tensor, source in sources(graph, tensors).items():  # graph order: sources first
        base = added.get(source) or stats.minmax(source)
        if base is None or stats.minmax(tensor) is not None:
            continue
        added[tensor] = _image(producers[tensor].op_type, base)
    if not added:
        return stats
    results = {StatRequest(tensor, "minmax"): minmax for tensor, minmax in added.items()}
    return dataclasses.replace(stats, results={**stats.results, **results})


def _image(op_type: str, source: MinMax) -> MinMax:
    function = INCREASING.get(op_type)
    if function is None:  # shares its input's scale: the input's range holds its values
        return source
    low, high = function(source.minimum), function(source.maximum)
    # Non-finite inputs stay counted: the node reading them stays float (placement rule 5).
    return MinMax(low, high, source.nonfinite, source.elements)
