"""How fair ``compare_latency`` is: two sessions of one model file, timed in turn, should
read 1.00x. With onnxruntime's default, an idle session's worker threads spin on and take
cores from the other's run; ``sessions.create_session(stop_spinning=True)`` stops them when
a run returns. Each model is timed both ways, ``--reps`` repetitions of ``--runs`` pairs
each; the spread of the repetitions is what a single check could read.

Run from the repository root: ``.venv/bin/python benchmarks/latency_pairs.py``
(``--no-write`` to leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import results  # noqa: E402
from benchmarks.quant_data import load_task  # noqa: E402
from onnx_shrink.runtime_check import bench, sessions  # noqa: E402

HEADING = "## latency pairs: one model against itself"
MODELS = "digits,dtln-1,nsnet2,magika,minilm,ppocr-rec,yolov8n-nudenet"


def same_model_ratios(model: Path, feed, stop_spinning: bool, reps: int, runs: int):
    """``reps`` ratios of two sessions of ``model``, and the first session's median ms."""
    first = sessions.create_session(model, stop_spinning=stop_spinning)
    second = sessions.create_session(model, stop_spinning=stop_spinning)
    comparisons = [
        bench.compare_latency(first, second, feed, runs=runs, warmup=5) for _ in range(reps)
    ]
    del first, second
    gc.collect()  # neither session's threads may outlive the measure
    ms = statistics.median(c.reference.p50_ms for c in comparisons)
    return sorted(c.ratio for c in comparisons), ms


def row(name: str, reps: int, runs: int) -> str:
    task = load_task(name, 1, quick=True)
    cells = [name, task.latency_input.replace("|", "\\|")]  # |rfft| in a table cell
    for stop_spinning in (False, True):
        ratios, ms = same_model_ratios(task.model, task.latency_feed, stop_spinning, reps, runs)
        cells += [
            f"{ms:.3f}",
            f"{statistics.median(ratios):.2f}",
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
        ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="pairs per repetition")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(row(name, args.reps, args.runs))
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            HEADING,
            "",
            *results.provenance(
                results.command_line("benchmarks/latency_pairs.py", argv), ("onnxruntime",)
            ),
            "",
            f"Two sessions of the same file, default threads, timed by `compare_latency`: "
            f"{args.reps} repetitions of {args.runs} interleaved pairs; the ratio should be "
            "1.00. ms: the first session's median run. Spinning: onnxruntime's default "
            "(idle threads spin on); stopped: `stop_spinning=True`, as `check` and the "
            "benchmarks create the sessions they compare.",
            "",
            "| model | input | spinning: ms | ratio | spread | stopped: ms | ratio | spread |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
            *rows,
            "",
        ]
    )
    results.publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
