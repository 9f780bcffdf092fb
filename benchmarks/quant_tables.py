"""The tables and ratios ``quant_vs_ort`` writes into RESULTS.md."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from benchmarks.quant_child import REPEAT_UNDER_S
from benchmarks.results import cell

if TYPE_CHECKING:
    from benchmarks.quant_vs_ort import Row

PACKAGES = ("onnx", "onnx-ir", "onnxruntime", "numpy", "Pillow")
MIB = 1024 * 1024


def _per_samples(row: Row, samples: list[int], values: dict[int, float], spec: str) -> str:
    if not row.config.calibrated and values:
        (only,) = values.values()
        return format(only, spec) if only >= 0 else f"> {-only:{spec}}"
    cells = []
    for n in samples:
        value = values.get(n)
        if value is None:
            cells.append("—")
        elif value < 0:
            cells.append(f"> {-value:{spec}}")  # killed at this RSS
        else:
            cells.append(format(value, spec))
    return " / ".join(cells)


def table(rows: list[Row], samples: list[int], metrics: tuple[str, ...]) -> str:
    at = "/".join(str(n) for n in samples)
    header = ["configuration", *metrics, f"{metrics[0]} @{at}", "latency × fp32", "bytes"]
    header.append(f"calib s @{at}")
    header += [f"calib peak RSS MiB @{at}", "note"]
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| --- |" + " ---: |" * (len(header) - 2) + " --- |")
    for r in rows:
        cells = [r.config.label]
        cells += [cell(r.metrics.get(m), ".4f") for m in metrics]
        per_count = _per_samples(r, samples, r.first_metric, ".3f") if r.first_metric else "—"
        cells.append(per_count)
        cells.append(cell(r.latency_ratio, ".2f"))
        cells.append(cell(r.bytes_on_disk, ","))
        if r.config.tool == "fp32":
            cells += ["—", "—"]
        else:
            cells.append(_per_samples(r, samples, r.seconds, ".2f"))
            peak_mib = {n: v / MIB for n, v in r.peak.items()}
            cells.append(_per_samples(r, samples, peak_mib, ".0f"))
        cells.append("; ".join(r.notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(results: dict, command: str, args: argparse.Namespace, heading: str) -> str:
    from benchmarks.results import provenance

    samples = sorted(args.samples)
    parts = [
        heading,
        "",
        *provenance(command, PACKAGES),
        "",
        "ORT static = `quantize_static(QDQ, per_channel=True, QUInt8 activations, QInt8 "
        "weights, reduce_range=False)` with each calibration method's defaults, after "
        "`quant_pre_process`; ORT dynamic = `quantize_dynamic(weight_type=QInt8)`. Fidelity "
        f"on held-out data, from the model calibrated on {max(samples)} samples; the first "
        f"metric also from each sample count's model (`@{'/'.join(map(str, samples))}`). "
        "Latency: "
        f"median of {args.runs} interleaved fp32/quantized pairs on one input, ORT CPU, "
        "default threads. Calibration s: the whole quantize call, median of "
        f"{args.timing_repeats} fresh processes (1 where a call takes over "
        f"{REPEAT_UNDER_S:g} s). Peak RSS: peak resident memory of the quantize call in a "
        "fresh process over its RSS before the call (the same median; "
        f'"> X": killed past {args.rss_limit_gib:g} GiB). See benchmarks/quant_vs_ort.py.',
        "",
    ]
    for name, (rows, info, metrics) in results.items():
        parts += [
            f"### {name}",
            "",
            f"Data: {info['split']}. Latency input: {info['latency_input']}. "
            f"ORT input: {info['pre']}. fp32 file: {info['fp32_bytes'] / MIB:.1f} MiB.",
            "",
            table(rows, samples, metrics),
            "",
            *ratios(rows, samples, info["pre_seconds"]),
            *fidelity_per_count(rows, samples, metrics[0]),
            *info["versus_best"],
            "",
        ]
    return "\n".join(parts)


def ratios(rows: list[Row], samples: list[int], pre_seconds: float) -> list[str]:
    """The issue's two cost criteria as ratios: our static quantization's wall time over
    ``quantize_static``'s (MinMax, its default, and the histogram methods; also with ORT's
    recommended ``quant_pre_process`` counted), and our calibration peak RSS over Entropy's."""
    by_key = {r.config.key: r for r in rows}
    ours = by_key.get("ours-static")
    if ours is None or not ours.seconds:
        return []

    def over(values: dict[int, float], theirs: dict[int, float], extra: float = 0.0) -> str:
        cells = []
        for n in samples:
            a, b = values.get(n), theirs.get(n)
            if a is None or b is None or a < 0 or b == 0:
                cells.append("—")
            elif b < 0:  # theirs was killed at -b: the ratio is below a / -b
                cells.append(f"< {a / -b:.2f}")
            else:
                cells.append(f"{a / (b + extra):.2f}")
        return " / ".join(cells)

    at = "/".join(str(n) for n in samples)
    lines = [f"Ours ({ours.config.label.removeprefix('ours: ')}) at {at} samples:"]
    for key in ("ort-minmax", "ort-entropy", "ort-percentile"):
        theirs = by_key.get(key)
        if theirs is None:
            continue
        lines.append(
            f"- wall time ÷ {theirs.config.label}: {over(ours.seconds, theirs.seconds)}; "
            f"with ORT's `quant_pre_process` counted: "
            f"{over(ours.seconds, theirs.seconds, pre_seconds)}"
        )
    minmax, theirs = by_key.get("ours-minmax"), by_key.get("ort-minmax")
    if minmax is not None and theirs is not None and minmax.seconds:
        lines.append(
            f"- the same calibration method: {minmax.config.label.removeprefix('ours: ')} "
            f"÷ {theirs.config.label}: {over(minmax.seconds, theirs.seconds)}"
        )
    entropy = by_key.get("ort-entropy")
    if entropy is not None:
        lines.append(
            "- calibration peak RSS ÷ ORT Entropy's: "
            + over({n: float(v) for n, v in ours.peak.items()}, entropy.peak)
        )
    return [*lines, ""]


def fidelity_per_count(rows: list[Row], samples: list[int], metric: str) -> list[str]:
    """Our default's (and our bias-corrected) first metric at each sample count against ORT's
    best static row at the same count (higher is better for every task's first metric)."""
    by_key = {r.config.key: r for r in rows}
    theirs = [r for r in rows if r.config.tool == "ort-static"]
    versus = {}  # ORT's best static row at each count, the same for each of our rows
    for n in samples:
        at_n = [r for r in theirs if n in r.first_metric]
        best = max(at_n, key=lambda r: r.first_metric[n]) if at_n else None
        method = best.config.label.rsplit(" ", 1)[-1] if best else ""
        versus[n] = f"{best.first_metric[n]:.3f} ({method})" if best else "—"
    lines = []
    for key, what in (("ours-static", "ours"), ("ours-bias", "ours bias-corrected")):
        ours = by_key.get(key)
        if ours is None or not ours.first_metric:
            continue
        cells = []
        for n in samples:
            mine = f"{ours.first_metric[n]:.3f}" if n in ours.first_metric else "—"
            cells.append(f"{n}: {mine} vs {versus[n]}")
        lines.append(
            f"- {metric}, {what} vs ORT's best static method at each sample count: "
            + "; ".join(cells)
        )
    return lines
