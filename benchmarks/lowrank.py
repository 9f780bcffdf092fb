"""``lowrank`` on MiniLM and the PP-OCRv4 recognizer head: data-free vs activation-aware SVD.

For each model, at 20, 30 and 50 % fewer parameters in the targeted layers (MiniLM: every
constant MatMul; PP-OCRv4 rec: the 120 x 6625 head), six variants of the pass:

* data-free -- plain SVD of W (``activation_aware=False``; no calibration runs);
* activation-aware -- SVD of S·W, S the Cholesky factor of the input Gram XᵀX;
* activation-aware + refit -- then B re-solved by least squares on the calibration inputs;
* activation-aware, output-error budget -- ranks spent on each layer's relative output error
  (``budget_metric=output``) instead of the weight's;
* activation-aware, model-output budget, in sample -- ranks spent on the model's output
  error, measured on the calibration data with each layer alone factorized at 6 ranks
  (``budget_metric=model-output, held_out=False``);
* activation-aware, model-output budget (the pass's default) -- the same, but each layer's
  factors are made from one half of the calibration samples and measured on the other half
  (both ways), so the budget sees the error on samples the factors were not fitted to.

In the first three variants the budget picks the same ranks as plain SVD (it reads the
weights' spectra), so they compare at exactly equal parameters; the others pick their own
ranks and meet the same budget to within one rank step ("params removed" shows by how much).
"× plain" is the error over plain SVD's at the same reduction.

The calibration and evaluation samples are separate (``benchmarks/quant_data.py``'s splits).
Reported: the model's task metrics against fp32, the relative L2 error of its float output
(mean over evaluation samples), parameters removed in the targeted layers, MACs removed as
the pipeline reports them for the lowrank step (per one sample, symbolic dims and rows that
shape inference cannot know counted once: MiniLM per token, the PP-OCRv4 head per row) and as
counted on the shapes of a real one-sample run (``runtime_check.shapes``: one sentence of 22
tokens, one 48x320 line), the saved file's bytes against 4 bytes per removed parameter, and
onnxruntime CPU latency against the folded fp32 model, timed interleaved
(``compare_latency``) at 1 sample and 16.

    python -m benchmarks.lowrank [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import results
from benchmarks.quant_data import Task, load_task, write_calibration
from onnx_shrink import shrink
from onnx_shrink.compiler import io, stats
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.lowrank import LowRankPass
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.runtime_check import bench, sessions, shapes

REDUCTIONS = (0.2, 0.3, 0.5)
VARIANTS = {
    "data-free SVD": {"activation_aware": False},
    "activation-aware": {"activation_aware": True, "budget_metric": "weight"},
    "activation-aware + refit": {
        "activation_aware": True,
        "refit": True,
        "budget_metric": "weight",
    },
    "activation-aware, output-error budget": {"activation_aware": True, "budget_metric": "output"},
    "activation-aware, model-output budget, in sample": {
        "activation_aware": True,
        "budget_metric": "model-output",
        "held_out": False,
    },
    "activation-aware, model-output budget (default)": {},
}


def _outputs(path: Path, feed: dict[str, np.ndarray], output_index: int) -> np.ndarray:
    session = sessions.create_session(str(path))
    names = {i.name for i in session.get_inputs()}
    out = session.get_outputs()[output_index].name
    count = len(next(iter(feed.values())))
    parts = [
        session.run([out], {k: v[s : s + 16] for k, v in feed.items() if k in names})[0]
        for s in range(0, count, 16)
    ]
    return np.concatenate(parts)


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    diff = candidate.reshape(len(candidate), -1).astype(np.float64) - ref
    return float(np.mean(np.linalg.norm(diff, axis=1) / np.linalg.norm(ref, axis=1)))


def _latency(reference: Path, candidate: Path, feed: dict[str, np.ndarray], runs: int) -> str:
    ref = sessions.create_session(str(reference), stop_spinning=True)
    cand = sessions.create_session(str(candidate), stop_spinning=True)
    names = {i.name for i in ref.get_inputs()}
    ratios = []
    for batch in (1, 16):
        sized = {k: v[:batch] for k, v in feed.items() if k in names}
        ratios.append(bench.compare_latency(ref, cand, sized, runs=runs, warmup=3).ratio)
    return " / ".join(f"{r:.2f}" for r in ratios)


def _run_macs(path: Path, feed: dict[str, np.ndarray]) -> int:
    """MACs of one run of the saved model on ``feed`` (shapes observed, not inferred)."""
    model = io.load(path)
    return stats.measure(model, shapes.observed(model, feed)).macs


def _head_node(path: Path) -> str:
    """The MatMul with the largest constant weight (PP-OCRv4 rec: the 120 x 6625 head)."""
    model = io.load(path)
    plans = LowRankPass(activation_aware=False).plan(model)
    return max(plans, key=lambda p: p.params_before).node


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every variant of one model is run and scored against."""

    task: Task
    folded: Path
    calib: Path
    only: tuple[str, ...]
    targeted: int
    output_index: int
    reference_out: np.ndarray
    reference_pred: object
    fold_bytes: int
    fold_macs: int
    runs: int


def _setup(name: str, task: Task, folder: Path, quick: bool) -> _Setup:
    calib = write_calibration(task, len(next(iter(task.calibration.values()))), folder / "calib")
    folded = folder / "fold.onnx"
    shrink(task.model, [FoldPass()], output=folded, check=False)
    output_index = 0
    if name == "minilm":
        output_index = next(
            i
            for i, o in enumerate(sessions.create_session(str(folded)).get_outputs())
            if len(o.shape) == 2 and o.type == "tensor(float)"
        )
    only = (_head_node(folded),) if name == "ppocr-rec" else ()
    plans = LowRankPass(only=only, activation_aware=False).plan(io.load(folded))
    targeted = sum(p.params_before for p in plans if p.rank or p.reason.startswith("the budget"))
    return _Setup(
        task,
        folded,
        calib,
        only,
        targeted,
        output_index,
        _outputs(task.model, task.evaluation, output_index),
        task.predict(sessions.create_session(str(task.model))),
        folded.stat().st_size,
        _run_macs(folded, task.latency_feed),
        10 if quick else 30,
    )


def _row(setup: _Setup, reduction: float, variant: str, out: Path) -> tuple[list[str], float]:
    """One table row (its "× plain" cell left empty) and the variant's output error."""
    task = setup.task
    options = VARIANTS.get(variant, {"budget_metric": "weight"})
    passes = [LowRankPass(reduction=reduction, only=setup.only, **options)]
    if "quant" in variant:
        passes.append(QuantDynamicPass())
    result = shrink(setup.folded, passes, output=out, calibration=setup.calib, check=False)
    before, after = result.steps[0].before, result.steps[0].after  # the lowrank step
    metrics = task.fidelity(setup.reference_pred, task.predict(sessions.create_session(str(out))))
    error = _relative_error(setup.reference_out, _outputs(out, task.evaluation, setup.output_index))
    delta = result.output_bytes - setup.fold_bytes
    run_removed = setup.fold_macs - _run_macs(out, task.latency_feed)
    row = [
        f"{int(reduction * 100)} %: {variant}",
        f"{(before.params - after.params) / setup.targeted:.1%}",
        f"{error:.4f}",
        "",
        *(f"{metrics[m]:.4f}" for m in task.metrics),
        f"{before.macs - after.macs:,} ({1 - after.macs / before.macs:.1%})",
        f"{run_removed:,} ({run_removed / setup.fold_macs:.1%})",
        f"{result.output_bytes:,} ({delta:+,} / {-4 * (before.params - after.params):+,})",
        _latency(setup.folded, out, task.evaluation, setup.runs),
    ]
    return row, error


def run_model(name: str, task: Task, folder: Path, quick: bool) -> str:
    setup = _setup(name, task, folder, quick)
    header = ["variant", "params removed", "rel. output error", "× plain", *task.metrics]
    header += ["MACs removed: pipeline", "1-sample run (of model)"]
    header += ["bytes (Δ / Δ 4·params)", "latency × fp32 @1/@16"]
    rows = []
    plain_error: dict[float, float] = {}
    configs = [(r, v) for r in REDUCTIONS for v in VARIANTS]
    configs.append((0.3, "activation-aware, then quant-dynamic"))
    for reduction, variant in configs:
        row, error = _row(setup, reduction, variant, folder / f"{reduction}-{len(rows)}.onnx")
        plain_error.setdefault(reduction, error)  # data-free SVD runs first at each reduction
        row[3] = f"{error / plain_error[reduction]:.2f}"
        rows.append(row)
        print(name, row, file=sys.stderr)
    only = f" ({setup.only[0]})" if setup.only else ""
    lines = [f"### {name}", "", task.split + ".", ""]
    lines.append(f"Targeted layers: {setup.targeted:,} parameters{only}.")
    lines.append(f"Folded fp32 file: {setup.fold_bytes:,} bytes.")
    lines.append(f"MACs of one run ({task.latency_input}): {setup.fold_macs:,}.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing runs")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    parser.add_argument("--models", default="minilm,ppocr-rec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            task = load_task(name, calibration=32 if args.quick else 128, quick=args.quick)
            folder = Path(tmp) / name
            folder.mkdir()
            sections.append(run_model(name, task, folder, args.quick))
    command = results.command_line("-m benchmarks.lowrank", argv)
    header = results.provenance(command, ("onnx", "onnxruntime", "numpy"))
    text = "## lowrank\n\n" + "\n".join(header) + "\n\n" + "\n".join(sections)
    results.publish("## lowrank", text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
