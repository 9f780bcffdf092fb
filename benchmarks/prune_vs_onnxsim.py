"""Side by side: onnx-shrink's ``prune`` pass against onnxsim 0.8.1's magnitude pruning.

Models: the digits CNN (``models.digits``), ``models.builders`` CNN and transformer block,
PP-OCRv4 det/rec and MiniLM. Targets: 50% unstructured and 2:4. For each target:

* ``onnxsim`` -- ``onnxsim.apply_magnitude_pruning(model, sparsity=0.5)`` / ``(n=2, m=4)``;
* ``magnitude`` -- ``PrunePass(sparsity=0.5)`` / ``PrunePass(nm="2:4")`` (data-free);
* ``wanda+refit`` -- ``PrunePass(method="wanda")`` with its least-squares refit of
  MatMul/Gemm (Conv weights are not refit), calibrated on the task's calibration split.

Columns: fidelity on the evaluation split (``benchmarks.quant_data`` metrics: digits accuracy,
MiniLM embedding cosine, rec strings = fp32, det map IoU; builders: output cosine on seeded
random inputs), the median of interleaved ORT CPU latency ratios candidate / fp32
(``compare_latency``; < 1 is faster), bytes on disk and after zlib level 1 (where zeros pay).

Sections: this file writes "## prune vs onnxsim 0.8.1 (unstructured)"; each section is one
function (``unstructured_section``) so that structured pruning can add its own beside it.

Run from the repository root::

    .venv/bin/python -m pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/prune_vs_onnxsim.py [models...] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import quant_data  # noqa: E402
from benchmarks.results import command_line, machine, publish  # noqa: E402
from models import builders  # noqa: E402
from onnx_shrink import shrink  # noqa: E402
from onnx_shrink.passes.prune import PrunePass  # noqa: E402
from onnx_shrink.runtime_check import bench, sessions  # noqa: E402

UNSTRUCTURED_HEADING = "## prune vs onnxsim 0.8.1 (unstructured)"
MODELS = ("digits", "cnn", "transformer", "ppocr-det", "ppocr-rec", "minilm")
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"nm": "2:4"}}


@dataclasses.dataclass
class Row:
    model: str
    target: str
    tool: str
    fidelity: str
    latency_ratio: float | None
    size: bench.ModelSize
    note: str = ""


def builder_task(name: str) -> quant_data.Task:
    """A ``quant_data.Task`` for a ``models.builders`` model on seeded random inputs, scored
    by the cosine of its output to fp32's."""
    proto = builders.build_cnn() if name == "cnn" else builders.build_transformer_block()
    path = Path(tempfile.mkdtemp(prefix=f"prune-{name}-")) / f"{name}.onnx"
    onnx.save(proto, path)
    shape = (3, 32, 32) if name == "cnn" else (16, 64)
    rng = np.random.default_rng(0)
    input_name = proto.graph.input[0].name
    calib = {input_name: rng.normal(size=(64, *shape)).astype(np.float32)}
    evaluation = {input_name: rng.normal(size=(64, *shape)).astype(np.float32)}

    def predict(session) -> np.ndarray:
        return session.run(None, evaluation)[0].reshape(64, -1)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {"cosine": float(quant_data.cosine_rows(reference, candidate).mean())}

    return quant_data.Task(
        name=name,
        model=path,
        calibration=calib,
        evaluation=evaluation,
        latency_feed={k: v[:1] for k, v in evaluation.items()},
        latency_input=f"1 sample {'x'.join(map(str, shape))}",
        predict=predict,
        fidelity=fidelity,
        metrics=("cosine",),
        split="seeded normal inputs: 64 calibration, 64 evaluation",
    )


def load(name: str, quick: bool) -> quant_data.Task:
    if name in ("cnn", "transformer"):
        return builder_task(name)
    return quant_data.load_task(name, calibration=32 if quick else 64, quick=quick)


def tools(target: dict, calibration: Path) -> dict[str, Callable[[Path, Path], None]]:
    """Tool name -> function writing the pruned model of ``source`` to ``output``."""

    def onnxsim_prune(source: Path, output: Path) -> None:
        import onnxsim

        nm = {"n": 2, "m": 4} if "nm" in target else {"sparsity": target["sparsity"]}
        onnx.save(onnxsim.apply_magnitude_pruning(onnx.load(source), **nm), output)

    def ours(**options) -> Callable[[Path, Path], None]:
        def run(source: Path, output: Path) -> None:
            shrink(source, [PrunePass(**target, **options)], output=output, check=False,
                   calibration=calibration)  # fmt: skip

        return run

    return {
        "onnxsim": onnxsim_prune,
        "magnitude": ours(),
        "wanda+refit": ours(method="wanda"),
    }


def measure(task: quant_data.Task, candidate: Path, ref, reference_out, runs: int) -> tuple:
    """(fidelity text, latency ratio) of ``candidate`` against the task's fp32 model (its
    session ``ref``, and ``reference_out`` its predictions)."""
    cand = sessions.create_session(candidate, stop_spinning=True)
    metrics = task.fidelity(reference_out, task.predict(cand))
    fidelity = ", ".join(f"{k} {metrics[k]:.4f}" for k in task.metrics[:2])
    ratio = bench.compare_latency(ref, cand, task.latency_feed, runs=runs).ratio
    return fidelity, ratio


def bench_model(name: str, folder: Path, quick: bool) -> list[Row]:
    task = load(name, quick)
    calibration = quant_data.write_calibration(task, len(next(iter(task.calibration.values()))),
                                               folder / name)  # fmt: skip
    ref = sessions.create_session(task.model, stop_spinning=True)
    reference_out = task.predict(ref)
    runs = 10 if quick else 30
    _, base_ratio = measure(task, task.model, ref, reference_out, runs)  # two sessions of fp32
    rows = [Row(name, "—", "fp32", "—", base_ratio, bench.model_size(task.model))]
    for target_name, target in TARGETS.items():
        for tool, run in tools(target, calibration).items():
            output = folder / f"{name}-{tool}-{target_name.replace(':', '_')}.onnx"
            try:
                run(task.model, output)
                fidelity, ratio = measure(task, output, ref, reference_out, runs)
                rows.append(Row(name, target_name, tool, fidelity, ratio, bench.model_size(output)))
            except Exception as e:  # noqa: BLE001 - a failing tool is a result, not a crash
                note = str(e).strip().splitlines()[0][:120] if str(e).strip() else repr(e)
                rows.append(Row(name, target_name, tool, "—", None, bench.ModelSize(0, 0), note))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | target | tool | fidelity vs fp32 | latency ratio | on disk | zipped | note |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = "—" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x"
        lines.append(
            f"| {r.model} | {r.target} | {r.tool} | {r.fidelity} | {ratio} "
            f"| {r.size.bytes_on_disk:,} | {r.size.zipped_bytes:,} | {r.note} |"
        )
    return "\n".join(lines)


def unstructured_section(models: list[str], quick: bool, command: str) -> str:
    """The unstructured part: 50% and 2:4, onnxsim against magnitude and wanda+refit."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="prune-vs-onnxsim-") as tmp:
        for name in models:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, Path(tmp), quick)
    return "\n".join(
        [
            UNSTRUCTURED_HEADING,
            "",
            f"Command: `{command}`  ",
            f"Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}  ",
            f"Machine: {machine()}",
            "",
            "Fidelity on each task's evaluation split (`benchmarks/quant_data.py`; builders: "
            "output cosine on seeded normal inputs). Latency: median of interleaved ORT CPU "
            "ratios candidate / fp32 (the fp32 row is fp32 against itself). Sizes: file bytes "
            "and zlib level 1. onnx-shrink keeps dense storage (no sparse_initializer in "
            "onnx_ir), so zeros pay only once zipped; no ORT CPU kernel skips them.",
            "",
            table(rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(MODELS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and latency runs")
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ort.set_default_logger_severity(3)
    command = command_line("benchmarks/prune_vs_onnxsim.py", argv)
    text = unstructured_section(args.models or list(MODELS), args.quick, command)
    publish(UNSTRUCTURED_HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
