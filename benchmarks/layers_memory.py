"""Peak memory of the per-layer comparison on MiniLM: 200 samples against 1 sample.

The requirement: comparing every layer of MiniLM over 200 samples stays under 2x the memory
of doing it over 1 sample. For each sample count and each candidate this starts a fresh child
process that runs::

    check(minilm, candidate, data.npz, layers=True, latency_runs=0)

and reports the child's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), both in all and
above the child's baseline (its peak after imports and before ``check``, so the import of
onnx/onnxruntime/onnxscript is not counted as the comparison's memory).

Data: ``models.text.minilm_dataset`` writes the first 200 sentences of
``models/text_sentences.txt`` tokenized for MiniLM (one padded length L for all rows); the
1-sample file is row 0 of the same arrays, so both runs see sequences of the same length.
Candidates: ``self`` (MiniLM against itself) and ``perturbed`` (noise of 0.5 x std added to
the weight of encoder layer 1's FFN up-projection MatMul).

Run, from the repository root::

    .venv/bin/python benchmarks/layers_memory.py            # prints and writes RESULTS.md

The table goes to stdout and, under the heading "## per-layer comparison memory (MiniLM)",
into ``benchmarks/RESULTS.md`` (that section is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, provenance, publish  # noqa: E402
from models.perturb import perturb_node_weight  # noqa: E402

HEADING = "## per-layer comparison memory (MiniLM)"
PACKAGES = ("onnx", "onnxruntime", "numpy")
PERTURBED_NODE = "encoder/layer.1/intermediate/dense/MatMul"
LIMIT = 2.0


def max_rss_bytes() -> int:
    """Peak RSS of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(reference: str, candidate: str, data: str) -> int:
    """Run the per-layer check once and print one JSON line of measurements."""
    import onnxruntime as ort

    from onnx_shrink.runtime_check import check

    ort.set_default_logger_severity(3)
    baseline = max_rss_bytes()
    start = time.perf_counter()
    report = check(reference, candidate, data, layers=True, latency_runs=0)
    seconds = time.perf_counter() - start
    assert report.layers is not None
    first = report.layers.first_jump
    print(
        json.dumps(
            {
                "baseline_bytes": baseline,
                "peak_bytes": max_rss_bytes(),
                "seconds": seconds,
                "samples": report.layers.samples,
                "tensors": len(report.layers.layers),
                "first_jump": first.tensor if first else None,
                "passed": report.passed,
            }
        )
    )
    return 0


def measure(reference: Path, candidate: Path, data: Path) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", reference, candidate, data]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| candidate | samples | L | tensors compared | peak RSS MiB | above baseline MiB "
        "| time s | first jump |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['samples']} | {r['length']} | {r['tensors']} "
            f"| {mib(r['peak_bytes'])} | {mib(r['peak_bytes'] - r['baseline_bytes'])} "
            f"| {r['seconds']:.1f} | {r['first_jump'] or '—'} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, object]], few: int, many: int) -> list[str]:
    out = []
    for cand in dict.fromkeys(r["candidate"] for r in rows):
        by_n = {r["samples"]: r for r in rows if r["candidate"] == cand}
        if few not in by_n or many not in by_n:
            continue
        a, b = by_n[few], by_n[many]
        total = b["peak_bytes"] / a["peak_bytes"]
        grown = (b["peak_bytes"] - b["baseline_bytes"]) / (a["peak_bytes"] - a["baseline_bytes"])
        verdict = "under" if total < LIMIT else "NOT under"
        out.append(
            f"- {cand}: peak RSS {many} / {few} samples = **{total:.3f}x** ({verdict} {LIMIT:g}x); "
            f"above baseline {grown:.3f}x."
        )
    return out


def section(rows: list[dict[str, object]], command: str, few: int, many: int) -> str:
    return "\n".join(
        [
            HEADING,
            "",
            *provenance(command, PACKAGES),
            "",
            "Each row is a fresh child process running `check(minilm, candidate, data, "
            "layers=True, latency_runs=0)` on CPU over real sentences (`models.text`, "
            f"{many} sentences of `models/text_sentences.txt`; the {few}-sample file is row 0 "
            "of the same arrays, so L, the padded length, is the same). Peak RSS = the child's "
            "`ru_maxrss`; above baseline = minus its peak after imports, before `check`. "
            "`perturbed` = 0.5 x std noise on the weight of "
            f"`{PERTURBED_NODE}`.",
            "",
            table(rows),
            "",
            *ratios(rows, few, many),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs=2, default=[1, 200], metavar=("FEW", "MANY"))
    parser.add_argument(
        "--candidates", nargs="+", choices=["self", "perturbed"], default=["self", "perturbed"]
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    few, many = args.samples

    from models.fetch import fetch
    from models.text import minilm_dataset

    reference = fetch("minilm")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="layers-memory-") as tmp:
        folder = Path(tmp)
        data_many = minilm_dataset(folder / f"minilm-{many}.npz", many)
        with np.load(data_many) as arrays:
            full = {k: arrays[k] for k in arrays.files}
        data_few = folder / f"minilm-{few}.npz"
        np.savez(data_few, **{k: v[:few] for k, v in full.items()})
        length = full["input_ids"].shape[1]
        candidates = {"self": reference}
        if "perturbed" in args.candidates:
            candidates["perturbed"] = folder / "minilm-perturbed.onnx"
            born = perturb_node_weight(reference, candidates["perturbed"], PERTURBED_NODE)
            print(f"perturbed: error is born at {born}", file=sys.stderr)
        for name in args.candidates:
            for n, data in ((few, data_few), (many, data_many)):
                print(f"{name}, {n} samples ...", file=sys.stderr, flush=True)
                result = measure(reference, candidates[name], data)
                rows.append({"candidate": name, "length": length, **result})
    command = command_line("benchmarks/layers_memory.py", argv)
    text = section(rows, command, few, many)
    publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
