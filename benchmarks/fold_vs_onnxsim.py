"""Side by side: onnx-shrink's ``fold`` pass against onnxsim 0.8.1 on the real models.

For every model registered in ``models.fetch.REAL_MODELS`` (MiniLM, PP-OCR det/rec/cls, both
Silero VAD exports, YOLOv8n, DTLN stage 1) this measures, for the original file, our ``fold`` and
``onnxsim.simplify(model)`` with its defaults:

* nodes: every node, If/Loop/Scan bodies included (main-graph nodes in parentheses);
* bytes on disk of the saved file;
* wall time of the transformation alone (median of ``--repeat`` runs; loading and saving are
  not timed);
* max abs error of every output against the original on onnxruntime CPU, on the seeded
  realistic inputs of ``models.inputs.sample_inputs`` (the ones the fold tests use), and the
  same error relative to the output scale, ``err / max(1, max|reference|)``.

A tool that raises is reported with the first line of its error instead of numbers.

Setup and run, from the repository root::

    .venv/bin/python -m pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/fold_vs_onnxsim.py            # prints and writes RESULTS.md

The table goes to stdout and, under the heading "## fold vs onnxsim 0.8.1", into
``benchmarks/RESULTS.md`` (that section is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import cell, command_line, first_line, provenance, publish  # noqa: E402
from models.fetch import REAL_MODELS, fetch  # noqa: E402
from models.inputs import sample_inputs  # noqa: E402
from onnx_shrink.compiler import io  # noqa: E402
from onnx_shrink.passes.fold import FoldPass  # noqa: E402

HEADING = "## fold vs onnxsim 0.8.1"
PACKAGES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxsim")
ONNXSIM_VERSION = "0.8.1"


@dataclass
class Row:
    model: str
    tool: str
    nodes: int | None = None
    main_nodes: int | None = None
    bytes_on_disk: int | None = None
    seconds: float | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    note: str = ""


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of ``graph`` plus those of every subgraph at any depth."""
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in attr.graphs)
    return total


def run_model(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def errors(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float]:
    """Worst max-abs error over outputs, and the worst of err / max(1, max|reference|)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs, the original has {len(reference)}")
    worst_abs, worst_rel = 0.0, 0.0
    for ref, got in zip(reference, candidate, strict=True):
        if ref.shape != got.shape:
            raise ValueError(f"output shape {got.shape}, the original has {ref.shape}")
        if ref.size == 0:
            continue
        err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
        scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64)))))
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
    return worst_abs, worst_rel


def describe_file(row: Row, path: Path) -> None:
    proto = onnx.load_model(str(path), load_external_data=False)
    row.nodes, row.main_nodes = count_nodes(proto.graph), len(proto.graph.node)
    row.bytes_on_disk = io.file_bytes(path)


def bench_fold(name: str, src: Path, out: Path, repeat: int) -> Row:
    row = Row(name, "fold")
    model = io.load(src)
    times, result = [], None
    for _ in range(repeat):  # FoldPass is functional: the loaded model stays as it was
        started = time.perf_counter()
        result = FoldPass()(model)
        times.append(time.perf_counter() - started)
    assert result is not None
    row.seconds = statistics.median(times)
    if not result.modified:
        row.note = "modified=False"
    io.save(result.model, out)
    describe_file(row, out)
    return row


def bench_onnxsim(name: str, src: Path, out: Path, repeat: int) -> Row:
    import onnxsim

    row = Row(name, f"onnxsim {ONNXSIM_VERSION}")
    proto = onnx.load_model(str(src))
    times, simplified, ok = [], None, False
    for _ in range(repeat):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        started = time.perf_counter()
        simplified, ok = onnxsim.simplify(copy)
        times.append(time.perf_counter() - started)
    assert simplified is not None
    row.seconds = statistics.median(times)
    if not ok:
        row.note = "onnxsim check failed"
    onnx.save_model(simplified, str(out))
    describe_file(row, out)
    return row


def bench_model(name: str, workdir: Path, repeat: int) -> list[Row]:
    src = fetch(name)
    feeds = sample_inputs(name)
    original = Row(name, "original")
    describe_file(original, src)
    reference = run_model(src, feeds)
    original.max_abs_err = original.rel_err = 0.0
    rows = [original]
    for tool, bench in (("fold", bench_fold), (f"onnxsim {ONNXSIM_VERSION}", bench_onnxsim)):
        out = workdir / f"{name}.{tool.split()[0]}.onnx"
        try:
            row = bench(name, src, out, repeat)
        except Exception as e:  # noqa: BLE001 - a failing tool is a result, not a crash
            rows.append(Row(name, tool, note=f"FAILED: {first_line(e, limit=240)}"))
            continue
        try:
            row.max_abs_err, row.rel_err = errors(reference, run_model(out, feeds))
        except Exception as e:  # noqa: BLE001
            row.note = (
                row.note + "; " if row.note else ""
            ) + f"RUN FAILED: {first_line(e, limit=240)}"
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | tool | nodes (main) | bytes on disk | vs original | time s "
        "| max abs err | err / scale | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    originals = {r.model: r for r in rows if r.tool == "original"}
    for r in rows:
        base = originals[r.model].bytes_on_disk
        delta = (
            f"{100.0 * (r.bytes_on_disk - base) / base:+.2f}%"
            if r.bytes_on_disk is not None and base
            else "—"
        )
        nodes = "—" if r.nodes is None else f"{r.nodes} ({r.main_nodes})"
        lines.append(
            f"| {r.model} | {r.tool} | {nodes} | {cell(r.bytes_on_disk, ',')} | {delta} "
            f"| {cell(r.seconds, '.3f')} | {cell(r.max_abs_err, '.3g')} "
            f"| {cell(r.rel_err, '.3g')} | {r.note} |"
        )
    return "\n".join(lines)


def section(rows: list[Row], command: str, repeat: int) -> str:
    return "\n".join(
        [
            HEADING,
            "",
            *provenance(command, PACKAGES),
            "",
            "Nodes count If/Loop/Scan bodies too (main graph in parentheses). Time: the transform "
            f"alone, median of {repeat} runs (fold = `FoldPass()(model)` on a loaded model, "
            "onnxsim = `onnxsim.simplify(model)` with defaults). Errors: onnxruntime CPU, "
            "original vs transformed, on `models.inputs.sample_inputs(name, seed=0)`; "
            "err / scale = max abs err / max(1, max|reference output|), worst output.",
            "",
            table(rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(REAL_MODELS)} (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ort.set_default_logger_severity(3)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fold-vs-onnxsim-") as tmp:
        for name in args.models or list(REAL_MODELS):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, Path(tmp), args.repeat)
    command = command_line("benchmarks/fold_vs_onnxsim.py", argv)
    text = section(rows, command, args.repeat)
    publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
