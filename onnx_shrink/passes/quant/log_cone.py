"""A Log's linear cone: the nodes whose output reaches a ``Log`` through ops that keep small
values small, which int8 activations would erase.

A log-mel front end (openWakeWord's melspectrogram: ``Conv`` STFT, ``Pow``, ``Add``, the mel
filterbank ``MatMul``, ``Clip``, ``Log``) computes a power spectrum whose bins span 80 dB and
more: a quiet clip's bins lie far below a loud one's, and a frame's high bins far below its
low ones. ``Log`` turns a value's *relative* error into its absolute error. A uniform int8
grid fitted to the loudest bins has a step of max / 255: every bin below half a step becomes 0
(then the ``Clip`` floor, 1e-10, or -100 dB), and those just above it move by tens of
percent. Quantized so (calibrated on 16 clips 20-80 dB loud, measured on 16 others), the mel
model's output was off by 77 dB on average, and by 34 dB with ``quant-dynamic`` (its
``MatMul`` alone); onnxruntime's ``quantize_static`` by 37.5 dB (MinMax; Percentile 37.2),
its ``quantize_dynamic`` by 34.4 dB. No calibration method helps: no range fits both ends of
the spectrum. ``quant-weight``'s run-time int8 activations (``accuracy_level`` 4) cost the
filterbank less, but still: 14.8 dB SNR, against 42.4 dB at level 1 (fp32); with 8-bit codes
instead of 4-bit ones, 70.8 dB (openWakeWord's sample clips, ``fold,quant-weight``).

So a node stays float when its output (whatever the node computes) reaches a ``Log``'s
input through the ops of ``CARRIES_SMALL_VALUES`` only: shape ops, slicing and joining,
linear layers, products and sums, powers, ``Abs``/``Relu``/``Clip``/``Max``, pools and
reductions, casts between floats.
Past anything else the cone ends: ``Exp``, ``Softmax``, ``Sigmoid``, ``Tanh``, ``Softplus``
turn an absolute error of their input into a relative one of their output (``Log(Softmax)``
needs no precise logits: its cone stops at the ``Softmax``), and normalizations divide the
scale away; an op not listed ends it too. ``Log`` itself ends it.

The reach is limited: at most ``MAX_LAYERS`` weighted layers (``Conv``, ``MatMul``, ``Gemm``,
``ConvTranspose``, ``Einsum``) from a node to the ``Log``, the node counting when it is one,
and no further step once the walk has reached more than ``MAX_VISITED`` nodes. A front end
has two (the transform and the filterbank); a deep CNN that ends in a ``Log`` keeps only its
last two layers float, not the whole network.
"""

from __future__ import annotations

import onnx_ir as ir

CARRIES_SMALL_VALUES = frozenset(
    {
        # moving values
        "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice",
        "Gather", "Concat", "Split", "Pad", "Expand", "Tile", "Resize",
        # linear layers and arithmetic
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Add", "Sub", "Mul", "Div",
        "Neg", "Sum", "Mean", "Pow", "Sqrt", "Reciprocal", "BatchNormalization",
        # keeping or clipping magnitudes
        "Abs", "Relu", "LeakyRelu", "Clip", "Max", "Min", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "LpPool", "ReduceSum", "ReduceMean",
        "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMin", "Cast",
    }
)  # fmt: skip
"""Ops whose output is small where their input is: relative precision matters through them."""
FIRST_INPUT_ONLY = frozenset(
    {
        "Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Pad", "Expand", "Tile",
        "Resize", "Clip", "Pow", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1",
        "ReduceL2", "ReduceMax", "ReduceMin",
    }
)  # fmt: skip
"""Ops whose later inputs are parameters (a shape, indices, bounds, an exponent, axes): a
value read there does not carry into the output's magnitudes."""
WEIGHTED_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})
MAX_LAYERS = 2
MAX_VISITED = 256


INT8_HARM = "int8's even steps erase the small values a Log spreads out"


def reason(pass_name: str, harm: str = INT8_HARM, verb: str = "quantizes") -> str:
    """Why a node ``feeds_log`` is left as it is by ``pass_name``: what the pass would do to
    it (``harm``), and the option that makes the pass do it anyway (``verb``: "splits")."""
    return (
        f"its output reaches a Log through linear ops ({harm}; {pass_name}.log_inputs=true "
        f"{verb} it)"
    )


LOW_RANK_HARM = (
    "a low-rank mel filterbank's energies go negative: onnx-asr's NeMo front end gave NaN "
    "for 80% of its features"
)
"""What lowrank would do to a weight that ``feeds_log``: a truncated SVD of a non-negative
filterbank has negative entries, and its absolute error is a large relative one on the quiet
bins the Log spreads out."""
FLOAT16_HARM = "quiet bins fall below float16's normal range"
"""What fp16 would do to a node that ``feeds_log``: a quiet frame's power spectrum falls
into float16's subnormals, whose few bits the Log spreads out."""


def feeds_log(node: ir.Node) -> bool:
    """Whether ``node``'s output reaches the input of a ``Log`` in its graph through
    ``CARRIES_SMALL_VALUES`` alone, within ``MAX_LAYERS`` weighted layers (``node``
    included)."""
    # Whatever the node computes (a Sigmoid too), its output would be quantized.
    start = 1 if node.op_type in WEIGHTED_LAYERS else 0
    # Breadth first, keeping for each node the fewest layers met on the way to it.
    layers_at: dict[ir.Node, int] = {node: start}
    frontier = [node]
    while frontier and len(layers_at) <= MAX_VISITED:
        next_frontier = []
        for current in frontier:
            for reader in _readers(current):
                if reader.domain not in ("", "ai.onnx"):
                    continue
                if reader.op_type == "Log":
                    return True
                if reader.op_type not in CARRIES_SMALL_VALUES:
                    continue
                layers = layers_at[current] + (reader.op_type in WEIGHTED_LAYERS)
                if layers > MAX_LAYERS or layers_at.get(reader, MAX_LAYERS + 1) <= layers:
                    continue
                layers_at[reader] = layers
                next_frontier.append(reader)
        frontier = next_frontier
    return False


def _readers(node: ir.Node) -> list[ir.Node]:
    """The nodes of ``node``'s graph whose values an output of ``node`` carries into (not
    those reading it as a parameter: ``FIRST_INPUT_ONLY``)."""
    return [
        use.node
        for out in node.outputs
        if out is not None
        for use in out.uses()
        if use.node.graph is node.graph
        and (use.idx == 0 or use.node.op_type not in FIRST_INPUT_ONLY)
    ]
