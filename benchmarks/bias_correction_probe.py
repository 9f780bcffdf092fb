"""What empirical bias correction would give our static int8 models (a measurement, not a pass).

A quantized Conv's output drifts from the float one by a mean per output channel: its input
is rounded to the activation grid (systematically so where an activation clusters, as a
page's background does) and its weights to theirs. Subtracting that mean from the int32
bias is *empirical bias correction*. This script measures, on the quantized models that
``onnx_shrink.shrink(passes="fold,quant")`` writes, what it would change, before it becomes
part of the pass:

* ``local``: for each quantized Conv reading DQ(Q(x)), the mean per output channel of the
  quantized Conv minus that of the float Conv (the folded model's weights and bias) on the
  float ``x`` of the same quantized model, over the calibration samples; every Conv
  corrected at once (each correction is local: it does not count drift from upstream);
* ``activations``: the same with the quantized weights on both sides (the input's rounding
  only);
* ``weights``: the float and the quantized weights both on the rounded input DQ(Q(x))
  (the weights' rounding only).

Fidelity is each task's own, on its held-out evaluation set (``quant_data``).

Run from the repository root::

    .venv/bin/python benchmarks/bias_correction_probe.py                # YOLOv8n, rec, det
    .venv/bin/python benchmarks/bias_correction_probe.py --models ppocr-rec --samples 32 --no-write
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADING = "## empirical bias correction (measured on our int8 models; not a pass yet)"
PACKAGES = ("onnx", "onnx-ir", "onnxruntime", "numpy")
VARIANTS = ("local", "activations", "weights")
RUN_SAMPLES = 8


def _conv_pairs(quantized: onnx.ModelProto, folded: onnx.ModelProto):
    """(quantized Conv, its Q's input x, the DQ of x, the folded model's Conv, the bias's DQ)
    for every Conv that reads a Q/DQ'd activation and has a dequantized int32 bias."""
    producers = {out: node for node in quantized.graph.node for out in node.output}
    float_convs = {n.name: n for n in folded.graph.node if n.op_type == "Conv"}
    for conv in quantized.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 3 or conv.name not in float_convs:
            continue
        dq, bias = producers.get(conv.input[0]), producers.get(conv.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or bias is None:
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and bias.op_type == "DequantizeLinear":
            yield conv, q.input[0], dq.output[0], float_convs[conv.name], bias


def _probe_model(quantized, folded, pairs, variant: str) -> onnx.ModelProto:
    """The quantized model whose outputs are each pair's Conv output and its reference."""
    probe = onnx.ModelProto()
    probe.CopyFrom(quantized)
    del probe.graph.output[:]
    have = {i.name for i in probe.graph.initializer}
    float_inits = {i.name: i for i in folded.graph.initializer}
    for conv, x, x_rounded, float_conv, _ in pairs:
        reader = x_rounded if variant == "weights" else x
        weights = conv.input[1:] if variant == "activations" else float_conv.input[1:]
        for name in weights:
            if name in float_inits and name not in have:
                probe.graph.initializer.append(float_inits[name])
                have.add(name)
        attributes = {a.name: oh.get_attribute_value(a) for a in conv.attribute}
        reference = conv.output[0] + "::reference"
        probe.graph.node.append(
            oh.make_node("Conv", [reader, *weights], [reference], conv.name + "::ref", **attributes)
        )
        for name in (conv.output[0], reference):
            probe.graph.output.append(oh.make_empty_tensor_value_info(name))
    return probe


def corrected(quantized_path: Path, folded_path: Path, feeds: dict, variant: str, out: Path):
    """Write ``quantized_path`` with every pair's int32 bias corrected by its measured mean
    drift over ``feeds`` (arrays with samples on axis 0); returns the number corrected."""
    from onnx_shrink.runtime_check.sessions import create_session

    quantized, folded = onnx.load(str(quantized_path)), onnx.load(str(folded_path))
    pairs = list(_conv_pairs(quantized, folded))
    probe = _probe_model(quantized, folded, pairs, variant)
    session = create_session(probe.SerializeToString())
    names = [o.name for o in probe.graph.output]
    samples = len(next(iter(feeds.values())))
    sums: dict[str, np.ndarray] = {}
    for start in range(0, samples, RUN_SAMPLES):
        feed = {k: v[start : start + RUN_SAMPLES] for k, v in feeds.items()}
        for name, value in zip(names, session.run(names, feed), strict=True):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            per_sample = value.astype(np.float64).mean(axis=axes) * value.shape[0]
            sums[name] = sums.get(name, 0) + per_sample
    initializers = {i.name: i for i in quantized.graph.initializer}
    for conv, *_, dq in pairs:
        stored, scale = initializers[dq.input[0]], initializers[dq.input[1]]
        drift = (sums[conv.output[0]] - sums[conv.output[0] + "::reference"]) / samples
        step = numpy_helper.to_array(scale).astype(np.float64)
        bias = numpy_helper.to_array(stored).astype(np.int64) - np.round(drift / step)
        stored.CopyFrom(numpy_helper.from_array(bias.astype(np.int32), stored.name))
    onnx.save(quantized, str(out))
    return len(pairs)


def measure(name: str, samples: list[int], folder: Path) -> list[list[str]]:
    import onnx_shrink
    from benchmarks.quant_data import load_task, write_calibration
    from benchmarks.results import cell
    from onnx_shrink.runtime_check.sessions import create_session

    task = load_task(name)
    metrics = task.metrics
    reference = task.predict(create_session(task.model))
    folded = folder / f"{name}-fold.onnx"
    onnx_shrink.shrink(task.model, passes="fold", output=folded, check=False)
    rows = []
    for n in samples:
        calib = write_calibration(task, n, folder / f"{name}-{n}")
        quantized = folder / f"{name}-{n}-quant.onnx"
        onnx_shrink.shrink(folded, passes="quant", output=quantized, check=False, data=calib)
        models, feeds = {"none": quantized}, task.calibration_slice(n)
        for variant in VARIANTS:
            models[variant] = folder / f"{name}-{n}-{variant}.onnx"
            count = corrected(quantized, folded, feeds, variant, models[variant])
        for variant, path in models.items():
            scores = task.fidelity(reference, task.predict(create_session(path)))
            print(f"{name} {n} {variant}: {scores}", file=sys.stderr, flush=True)
            cells = [f"{m}: {cell(scores[m], '.4f')}" for m in metrics]
            rows.append([name, str(n), variant, *cells])
        rows.append([name, str(n), f"({count} Convs corrected)", ""])
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="yolov8n-nudenet,ppocr-rec,ppocr-det", help="comma-separated"
    )
    parser.add_argument("--samples", default="32,128", help="calibration sample counts")
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from benchmarks.results import provenance, publish

    samples = [int(s) for s in args.samples.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bias-correction-") as tmp:
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            rows += measure(name, samples, Path(tmp))
    command = " ".join(
        [".venv/bin/python", "benchmarks/bias_correction_probe.py", *map(shlex.quote, argv)]
    )
    lines = [HEADING, "", *provenance(command, PACKAGES), ""]
    lines += [
        "Each quantized Conv's int32 bias corrected by its mean drift per output channel over "
        "the calibration samples (variants in the script's docstring); `none`: our "
        "`fold,quant` model as written. Fidelity on the held-out evaluation set.",
        "",
        "| model | samples | correction | fidelity |",
        "| --- | ---: | --- | --- |",
    ]
    lines += ["| " + " | ".join([*row[:3], "; ".join(row[3:])]) + " |" for row in rows]
    publish(HEADING, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
