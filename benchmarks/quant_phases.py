"""Where ``fold,quant``'s time goes: the quantize call split into its phases, beside the
float model's own runs over the same samples (the floor no calibration can go under).

Each phase is the wall time of one function of the pipeline (``PHASES``), wrapped with a
timer for the run; nested phases are indented under the phase that calls them. The call is
made once to warm up, then ``--repeats`` times; the table gives the mean. Its total is
``shrink``'s, as ``quant_vs_ort`` times it, but in one warm process (``quant_vs_ort`` starts a
fresh one per call, so its figures are a few hundredths of a second higher).

The floor rows run the float model over the calibration samples as the statistics engine
runs them: runs of up to 8 samples where the first axis is dynamic (else 1), two at once, with
its intra-op threads (``collect_runs.session_threads``: one on two cores); once with weights
prepacked (onnxruntime's default), once without
(as calibration's session: ``collect_runs.open_session``).

Run from the repository root::

    .venv/bin/python benchmarks/quant_phases.py                       # all, into RESULTS.md
    .venv/bin/python benchmarks/quant_phases.py nsnet2 --samples 8,128 --no-write
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quant_data, results  # noqa: E402
from onnx_shrink.runtime_check import collect, collect_runs, sessions  # noqa: E402

HEADING = "## where quant's time goes"
FLOORS = ("floor: the fp32 model's runs, prepacked", "floor: the same, not prepacked")
MODELS = ("digits", "dtln-1", "nsnet2", "yolov8n-nudenet")
CALIBRATIONS = ("mse", "minmax")
# (depth, label, module, attribute): a phase and where it is measured.
PHASES = (
    (0, "load the model", "onnx_shrink.compiler.io", "load"),
    (0, "fold", "onnx_shrink.passes.fold", "FoldPass.call"),
    (0, "calibration statistics", "onnx_shrink.runtime_check.collect", "collect"),
    (1, "graph of statistics", "onnx_shrink.runtime_check.collect_graph", "instrument"),
    (1, "its session", "onnx_shrink.runtime_check.collect_runs", "open_session"),
    (1, "runs, folded in", "onnx_shrink.runtime_check.collect", "_Pass.run"),
    (2, "the probe: its runs and counts", "onnx_shrink.runtime_check.collect", "_Pass._probe"),
    (0, "Q/DQ plan written", "onnx_shrink.passes.quant.plan_writer", "write_plan"),
    (1, "activation ranges", "onnx_shrink.passes.quant.calibration", "tensor_range"),
    (0, "summary: MACs", "onnx_shrink.compiler.stats", "measure"),
    (0, "summary: bytes", "onnx_shrink.compiler.io.large_tensors", "saved_bytes"),
    (0, "save", "onnx_shrink.compiler.io", "save"),
)


@contextlib.contextmanager
def timed_phases(totals: dict[str, float]) -> Iterator[None]:
    """Wrap every phase's function with a timer adding to ``totals[label]``; unwrap after."""
    undo = []
    for _, label, module_name, attribute in PHASES:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - started

        setattr(owner, name, functools.wraps(original)(timed))
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def phases(task: quant_data.Task, npz: Path, calibration: str, repeats: int) -> dict[str, float]:
    """Mean seconds of each phase (and "total") over ``repeats`` warm calls."""
    from onnx_shrink import shrink

    def call() -> None:
        with tempfile.TemporaryDirectory() as folder:
            shrink(
                str(task.model),
                passes="fold,quant",
                sets=(f"quant.calibration={calibration}",),
                output=str(Path(folder) / "out.onnx"),
                check=False,
                data=str(npz),
            )

    call()
    totals: dict[str, float] = {}
    with timed_phases(totals):
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            totals["total"] = totals.get("total", 0.0) + time.perf_counter() - started
    return {label: seconds / repeats for label, seconds in totals.items()}


def floor(task: quant_data.Task, samples: int, prepack: bool, repeats: int) -> float:
    """Seconds the float model takes over ``samples`` calibration samples, run as the
    statistics engine runs them (see the module doc); the best of ``repeats``."""
    threads = collect_runs.session_threads("cpu")
    session = sessions.create_session(task.model, threads=threads, prepack=prepack)
    feed = task.calibration_slice(samples)
    joined = collect.MAX_RUN_SAMPLES
    try:
        session.run(None, {k: v[:joined] for k, v in feed.items()})
    except Exception:  # a fixed first axis, or one that is not the samples'
        joined = 1
    runs = [{k: v[i : i + joined] for k, v in feed.items()} for i in range(0, samples, joined)]
    best = np.inf
    with concurrent.futures.ThreadPoolExecutor(collect_runs.parallel_runs("cpu")) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda run: session.run(None, run), runs))
            best = min(best, time.perf_counter() - started)
    return best


def section(table: dict[str, dict[str, dict[str, float]]], command: str) -> str:
    """``table``: model -> column ("mse @8") -> phase label -> seconds; a table per model."""
    lines = [
        HEADING,
        "",
        *results.provenance(command, ("onnx", "onnxruntime", "onnxscript", "numpy")),
        "",
        "Seconds of one `shrink(passes='fold,quant')` call, warm, mean of the repeats; indented "
        "phases are part of the one above. Columns: calibration method @ samples. Floor: the "
        "float model alone over the same samples, runs of up to 8, two at once (see "
        "benchmarks/quant_phases.py).",
    ]
    for model, columns in table.items():
        rows = [["total", *(f"{c['total']:.3f}" for c in columns.values())]]
        for depth, label, _, _ in PHASES:
            cells = [f"{c.get(label, 0.0):.3f}" for c in columns.values()]
            rows.append(["&nbsp;" * 4 * depth + label, *cells])
        rest = [
            c["total"] - sum(c.get(p[1], 0.0) for p in PHASES if p[0] == 0)
            for c in columns.values()
        ]
        rows.append(
            ["the rest (planning, weights, the pipeline's own work)", *(f"{r:.3f}" for r in rest)]
        )
        rows += [[label, *(f"{c[label]:.3f}" for c in columns.values())] for label in FLOORS]
        lines += [
            "",
            f"### {model}",
            "",
            "| phase | " + " | ".join(columns) + " |",
            "| --- |" + " ---: |" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help="default: %(default)s")
    parser.add_argument("--samples", default="8,128", help="comma-separated counts")
    parser.add_argument("--calibration", default=",".join(CALIBRATIONS), help="methods")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.samples.split(",")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.models:
        task = quant_data.load_task(name, max(counts), quick=True)
        for samples in counts:
            with tempfile.TemporaryDirectory() as folder:
                npz = quant_data.write_calibration(task, samples, Path(folder))
                floors = {
                    label: floor(task, samples, prepack, 3)
                    for label, prepack in zip(FLOORS, (True, False), strict=True)
                }
                for method in args.calibration.split(","):
                    timing = phases(task, npz, method, args.repeats)
                    table.setdefault(name, {})[f"{method} @{samples}"] = {**timing, **floors}
                    print(f"{name} {method} @{samples}: {timing['total']:.3f} s", file=sys.stderr)
    command = results.command_line("benchmarks/quant_phases.py", argv)
    results.publish(HEADING, section(table, command), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
