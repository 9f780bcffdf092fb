"""Side by side: the time of ``--sensitivity`` (each quantized layer's output error alone)
against onnxruntime's route to the same figures.

onnxruntime has no sensitivity analysis. Its users' route to "the error one layer causes
alone" is ``quantize_static(..., nodes_to_quantize=[layer])`` (QDQ, per-channel, MinMax, on
the model ``quant_vs_ort`` gives it) and a run of the result against the float model over
the calibration samples, once per layer. This script times that route on ``--ort-layers``
layers (the first weighted layers of its model), and estimates
the whole ranking as their median times the layer count of ours. Beside it:

* ours as shipped: ``shrink(model, "fold,quant", data=..., sensitivity=True)``, the report's
  own seconds (every layer on the first 8 samples, the 16 worst again on all: see
  ``onnx_shrink.runtime_check.sensitivity_runs``), the hint measured;
* ours with every layer measured on every sample (the screening turned off), the reference
  the screened ranking is held against: the 10 worst, and the Spearman correlation of every
  layer's rank.

Setup and run, from the repository root::

    .venv/bin/python -m pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/sensitivity_vs_ort.py            # prints and writes RESULTS.md

The table goes to stdout and, under "## sensitivity vs onnxruntime's per-layer route", into
``benchmarks/RESULTS.md`` (that section is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks import quant_metrics, results
from benchmarks.quant_data import NpyStreamReader, load_task, write_calibration
from benchmarks.quant_ort_input import ort_input

HEADING = "## sensitivity vs onnxruntime's per-layer route"
WEIGHTED = ("Conv", "MatMul", "Gemm")


def ours(model: Path, npz: Path, screened: bool):
    """Our report of ``model`` calibrated on ``npz``: screened as shipped, or every layer
    on every sample (the screening's threshold out of reach)."""
    import onnx_shrink
    from onnx_shrink.runtime_check import sensitivity_runs

    screen = sensitivity_runs.SCREEN_SAMPLES if screened else sys.maxsize // 4
    with mock.patch.object(sensitivity_runs, "SCREEN_SAMPLES", screen):
        result = onnx_shrink.shrink(
            str(model), "fold,quant", data=str(npz), check=False, sensitivity=True
        )
    return result.sensitivity


def ort_layer_seconds(model: Path, calib_dir: Path, folder: Path, layers: int) -> list[float]:
    """Seconds of onnxruntime's route for each of the first ``layers`` weighted layers of
    ``model``: ``quantize_static`` with that node alone, a session of the result, its runs
    over the samples and the error against the float outputs (computed once, not timed)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime import quantization as q

    graph = onnx.load_model(str(model), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type in WEIGHTED and n.name][:layers]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    feeds = _feeds(calib_dir, inputs)
    reference = [session.run(None, feed) for feed in feeds]
    seconds = []
    for name in names:
        out = folder / "one-layer.onnx"
        started = time.perf_counter()
        q.quantize_static(
            str(model),
            str(out),
            NpyStreamReader(calib_dir, inputs),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_quantize=[name],
        )
        candidate = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = [candidate.run(None, feed) for feed in feeds]
        _worst_relative_error(reference, got)  # timed: the route's figure for the layer
        seconds.append(time.perf_counter() - started)
        print(f"  ORT {name}: {seconds[-1]:.2f} s", file=sys.stderr)
    return seconds


def _feeds(calib_dir: Path, inputs: list[str]) -> list[dict[str, np.ndarray]]:
    reader = NpyStreamReader(calib_dir, inputs)
    return list(iter(reader.get_next, None))


def _worst_relative_error(reference, got) -> float:
    """The largest ‖y_q − y‖/‖y‖ over the outputs, over all samples (ours ranks by it)."""
    errors = []
    for index in range(len(reference[0])):
        ref = np.concatenate([r[index].ravel() for r in reference]).astype(np.float64)
        cand = np.concatenate([g[index].ravel() for g in got]).astype(np.float64)
        errors.append(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-30))
    return max(errors)


def run_model(name: str, samples: int, ort_layers: int, folder: Path) -> list[str]:
    task = load_task(name, calibration=samples)
    npz = write_calibration(task, samples, folder / "calib")
    args = argparse.Namespace(rss_limit_gib=8.0, child_timeout=900.0)
    ort_model, _, _ = ort_input(task.model, folder, {samples: npz}, args)
    shipped = ours(task.model, npz, screened=True)
    full = ours(task.model, npz, screened=False)
    print(
        f"{name}: ours {shipped.seconds:.1f} s, every sample {full.seconds:.1f} s", file=sys.stderr
    )
    per_layer = ort_layer_seconds(ort_model, npz.parent, folder, ort_layers)
    by_node = {layer.position: layer.relative_error for layer in full.layers}
    positions = sorted(by_node)
    screened_errors = {layer.position: layer.relative_error for layer in shipped.layers}
    spearman = quant_metrics.spearman(
        np.array([by_node[p] for p in positions]), np.array([screened_errors[p] for p in positions])
    )
    top = [x.position for x in shipped.layers[:10]] == [x.position for x in full.layers[:10]]
    median = statistics.median(per_layer)
    weighted = sum(layer.op_type in WEIGHTED for layer in shipped.layers)
    every, only_weighted = median * len(shipped.layers), median * weighted
    return [
        name,
        f"{len(shipped.layers)} ({weighted})",
        f"{shipped.seconds:.1f}",
        f"{full.seconds:.1f}",
        "yes" if top else "no",
        f"{spearman:.3f}",
        f"{median:.2f} (median of {len(per_layer)})",
        f"{every:.0f} ({only_weighted:.0f})",
        f"{shipped.seconds / every:.2f} ({shipped.seconds / only_weighted:.2f})",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n-nudenet,ppocr-rec")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--ort-layers", type=int, default=4, help="layers ORT's route is timed on")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            rows.append(run_model(name, args.samples, args.ort_layers, folder))
    header = [
        "model",
        "layers (Conv, MatMul, Gemm)",
        "ours s",
        "ours, every layer on every sample, s",
        "same 10 worst, same order",
        "rank correlation (Spearman)",
        "ORT route s/layer",
        "ORT route s, estimated: every layer (weighted only)",
        "ours ÷ ORT route (weighted only)",
    ]
    command = results.command_line("benchmarks/sensitivity_vs_ort.py", argv)
    lines = [HEADING, "", *results.provenance(command, ("onnx", "onnxruntime", "numpy")), ""]
    lines.append(
        f"{args.samples} calibration samples (the models' `quant_vs_ort` data). Ours: the "
        "report's own seconds (its statistics, the combined runs, the hint measured), "
        "screened as shipped, then with every layer on every sample; the ranking columns "
        "hold the first against the second. ORT route: `quantize_static(QDQ, per-channel, "
        "MinMax, nodes_to_quantize=[layer])` of the model `quant_vs_ort` gives it, a "
        "session of the result and its runs over the samples, per layer, timed on the first "
        f"{args.ort_layers} weighted layers; estimated as their median times our layer "
        "count, and times the weighted layers among them (the layers a user would most "
        "likely probe). Our report ranks every layer the pass quantizes, activations "
        "included, and measures its hint; ORT's route neither. See "
        "benchmarks/sensitivity_vs_ort.py."
    )
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    results.publish(HEADING, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
