"""``quant``'s options: what ``--list-passes`` shows and ``--set quant.<name>=`` sets. The
rules they switch are ``static.QuantPass``'s (its docstring numbers them)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from onnx_shrink.compiler.options import check_options, option
from onnx_shrink.compiler.statistics import HistogramAccumulator
from onnx_shrink.passes.quant import stem


@dataclasses.dataclass(frozen=True)
class StaticOptions:
    """The options of ``quant``, in the order ``--list-passes`` lists them, checked when the
    pass is made."""

    calibration: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "mse",
        "how activation ranges are chosen from calibration data (entropy: mse's range for "
        "a tensor with under 64 values counted per level, too few for its KL divergence)",
        choices=("minmax", "percentile", "entropy", "mse"),
    )
    percentile: float = option(
        99.999, "kept mass for calibration=percentile", minimum=50.0, maximum=100.0
    )
    bins: int = option(
        2048,
        "histogram bins for percentile/entropy/mse (entropy counts at least 2048: its KL "
        "divergence needs 8 bins per 8-bit level)",
        minimum=128,
        maximum=HistogramAccumulator.MAX_BINS,
    )
    histogram_elements: int = option(
        65536,
        "count about this many elements of each sample per histogram, on a lattice that "
        "starts elsewhere in each sample (0: every element of every sample; ranges stay exact "
        "either way)",
        minimum=0,
    )
    histogram_elements_later: int = option(
        8192,
        "after the first samples (up to 16, which fix the histograms' edges), count about this "
        "many of each sample (never more than histogram_elements), each weighing as many as "
        "its lattice skips (0: as histogram_elements)",
        minimum=0,
    )
    activation_type: Literal["u8", "s8"] = option(
        "u8",
        "activation integers: u8 asymmetric or s8 symmetric (for targets that want s8: on "
        "onnxruntime's CPU provider int8 x int8 MatMuls ran 10x slower than u8 on MiniLM)",
        choices=("u8", "s8"),
    )
    per_channel: bool = option(True, "one weight scale per output channel")
    exclude_op_types: tuple[str, ...] = option((), "op types kept in float")
    exclude: tuple[str, ...] = option((), "node names or regexes kept in float", patterns=True)
    max_error: float = option(
        math.inf,
        "accuracy target: the largest relative error ||y_q - y|| / ||y|| (L2, over all the "
        "calibration samples) any float output may have against the model the pass gets "
        "(integer outputs: the float scores an ArgMax or comparison reads; an output joining "
        "parts of very different scales, a detector's boxes and class scores: its small part "
        "too); "
        "shrink() keeps the worst layers float (as --sensitivity ranks them) until it holds, "
        "and adds them to exclude (inf: none)",
        minimum=0.0,
        infinite=True,
    )
    activation_matmuls: bool = option(
        False, "quantize MatMuls of two activations too (attention scores and context)"
    )
    sensitive_ops: bool = option(
        False,
        "also quantize LayerNormalization, Softmax and a decomposed norm's Pow/Sqrt/Div/"
        "ReduceMean, kept float by default (int8 costs them accuracy): for accelerators that "
        "take QDQ norms; onnxruntime's CPU runs such a Softmax as QLinearSoftmax",
    )
    log_inputs: bool = option(
        False,
        "also quantize the nodes whose output reaches a Log through linear ops (a log-mel "
        "front end), kept float by default: int8's even steps erase the small values a Log "
        "spreads out",
    )
    int16: tuple[str, ...] = option(
        (), "node names or regexes whose activations use 16 bits", patterns=True
    )
    subgraphs: bool = option(
        True, "int8 weights (dynamic quantization) for MatMul/Gemm inside If/Loop/Scan bodies"
    )
    gather: bool = option(
        True, "store embedding tables (Gather) as int8 rows, dequantized on lookup"
    )
    lstm: bool = option(
        True,
        "int8 LSTM weights as onnxruntime's com.microsoft.DynamicQuantizeLSTM (no QDQ LSTM "
        "kernel exists; with fused=false, or a layout it cannot take, stored as for rnn)",
    )
    rnn: bool = option(
        True,
        "GRU and RNN weights stored as int8 per gate row behind a Cast and Mul that "
        "onnxruntime folds on load: a quarter of the bytes, still computed in float",
    )
    conv_transpose: bool = option(
        True,
        "ConvTranspose weights stored as int8 per output channel behind a Cast and Mul that "
        "onnxruntime folds on load (its CPU has no integer ConvTranspose: still computed in "
        "float, on a quarter of the bytes)",
    )
    tables: bool = option(
        True,
        "constant tables only Slice or Reshape read (a positional encoding) stored as int8 "
        "per feature behind a Cast and Mul that onnxruntime folds on load",
    )
    only: tuple[str, ...] = option(
        (), "quantize just these nodes (by name), e.g. to measure one layer's sensitivity"
    )
    fused: bool = option(
        True,
        "a quantized MatMul whose float output gets a constant bias becomes onnxruntime's "
        "com.microsoft.MatMulIntegerToFloat with that bias (its QDQ fusion leaves the Add "
        "apart), and an erf GELU after an integer kernel com.microsoft.Gelu (onnxruntime "
        "fuses none behind a DequantizeLinear; from opset 20, ONNX's Gelu either way); off: "
        "standard ONNX QDQ only",
    )
    narrow_storage: bool = option(
        True,
        "per-channel weight scales rounded up to float16 values, and constants stored in the "
        "narrowest type that holds them exactly (float16, int8/16/32) read through a Cast, "
        "which onnxruntime folds when it loads the model",
    )
    hard_activations: bool = option(
        True,
        "between integer kernels, HardSwish and HardSigmoid become Add, Clip and Mul, which "
        "onnxruntime's CPU runs on integers (it has none for them: each ran in float between "
        "a DequantizeLinear and a QuantizeLinear); off: kept as they are, in float",
    )
    float_stem: bool = option(
        True,
        "keep an image model's stem float: the Convs from the input up to the first with "
        f"{stem.STEM_MACS} or more multiply-adds per output value, where int8 saves less than "
        "quantizing and reordering the input costs",
    )
    dead_zones: bool = option(
        True,
        "a tensor whose every reader is flat below a level (hard-swish: -3) is quantized "
        "from that level up, with a grid point on it",
    )
    bias_correction: bool = option(
        False,
        "subtract each quantized Conv's mean output drift per channel, measured in a second "
        "run over the calibration data, from its int32 bias (not with only)",
    )
    bias_correction_samples: int = option(
        0,
        "measure the drift on the first this many calibration samples (0: all of them)",
        minimum=0,
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.only and not math.isinf(self.max_error):
            raise ValueError("max_error keeps layers float to meet it; with only it cannot")
