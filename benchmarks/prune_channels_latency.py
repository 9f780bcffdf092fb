"""Latency of ``prune-channels`` at one ratio, measured where a shared 2-core host is quiet
enough: one intra-op thread, ``--reps`` repetitions of 40 interleaved pairs, the median of
the repetitions' per-pair medians (pruned / unpruned; below 1 is faster).

Run from the repository root: ``.venv/bin/python benchmarks/prune_channels_latency.py``
(``--no-write`` to leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import results  # noqa: E402
from benchmarks.prune_channels_vs_onnxsim import load, prepared  # noqa: E402
from onnx_shrink.compiler import io  # noqa: E402
from onnx_shrink.passes.prune_channels import PruneChannelsPass  # noqa: E402
from onnx_shrink.runtime_check import bench, sessions  # noqa: E402

HEADING = "## prune-channels latency (1 thread)"


def ratios(name: str, ratio: float, reps: int, threads: int) -> list[float]:
    task = load(name, quick=True, calibration=1)
    model = prepared(str(task.model))
    pruned = PruneChannelsPass(ratio=ratio, reconstruct="off")(model.clone()).model
    base = sessions.create_session(io.to_bytes(model), threads=threads, stop_spinning=True)
    candidate = sessions.create_session(io.to_bytes(pruned), threads=threads, stop_spinning=True)
    return [
        bench.compare_latency(base, candidate, task.latency_feed, runs=40).ratio
        for _ in range(reps)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--models", default="digits,cnn,ppocr-det,ppocr-rec")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        measured = ratios(name, args.ratio, args.reps, args.threads)
        median = statistics.median(measured)
        spread = f"{min(measured):.2f}-{max(measured):.2f}"
        rows.append(f"| {name} | {median:.3f} | {1 / median:.2f}x | {spread} |")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            HEADING,
            "",
            *results.provenance(
                results.command_line("benchmarks/prune_channels_latency.py", argv),
                ("onnxruntime", "onnx-ir"),
            ),
            "",
            f"Ratio {args.ratio}, default options, no reconstruction (it changes no shape); "
            f"{args.threads} intra-op thread(s); median of {args.reps} repetitions of 40 "
            "interleaved pairs (pruned / unpruned).",
            "",
            "| model | latency ratio | speed-up | spread of repetitions |",
            "| --- | ---: | ---: | --- |",
            *rows,
            "",
        ]
    )
    results.publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
