"""Terminal presentation: the summary table, the check table and the pass list (rich).

Only presentation lives here; every figure comes from the result objects unchanged. Names
and paths are escaped: rich reads "[...]" in a string as markup and drops it (the summary's
"[calibrated on 32 samples in 0.0s]" never showed; a tensor "layers[0]/..." lost its index).
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from onnx_shrink.api import ShrinkResult
from onnx_shrink.compiler import options as options_mod
from onnx_shrink.compiler.stats import ModelStats, rising_bounds
from onnx_shrink.runtime_check import bench, check_notes, op_time, progress
from onnx_shrink.runtime_check.accuracy_target import TargetOutcome
from onnx_shrink.runtime_check.bench import BenchmarkReport, LatencyComparison
from onnx_shrink.runtime_check.checker import CheckReport
from onnx_shrink.runtime_check.layers import LayerReport
from onnx_shrink.runtime_check.numeric_report import NumericReport
from onnx_shrink.runtime_check.op_time import OpTimeComparison, OpTimes
from onnx_shrink.runtime_check.sensitivity_report import HINT_LAYERS, SensitivityReport
from onnx_shrink.wording import counted, human_bytes


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _arrow(before: float, after: float, fmt=human_count) -> str:
    if before == after:
        return fmt(before)
    change = f" ({_percent((after - before) / before)})" if before else ""
    return f"{fmt(before)} → {fmt(after)}{change}"


def _percent(change: float) -> str:
    """``change`` as a signed percentage, whole unless that reads 0 for a change: keycnn's
    fold went 2,674,654 -> 2,669,633 bytes, printed "2.6 MiB → 2.5 MiB (-0%)"."""
    text = f"{change:+.0%}"
    if change and text in ("+0%", "-0%"):
        text = f"{change * 100:+.1g}%"
    return text


def _macs_arrow(before: ModelStats, after: ModelStats) -> str:
    """MACs before -> after; "≥" marks a count that is a lower bound (nodes of unknown cost
    left out, or counted on a dim no inference or run could fix), and a change with a bound
    on either side has no percentage: it would compare a bound with a count."""

    def fmt(stats: ModelStats) -> str:
        return ("≥" if stats.nodes_without_macs else "") + human_count(stats.macs)

    if before.macs == after.macs and before.nodes_without_macs == after.nodes_without_macs:
        return fmt(before)
    exact = not before.nodes_without_macs and not after.nodes_without_macs
    change = (after.macs - before.macs) / before.macs if before.macs and exact else None
    percent = f" ({_percent(change)})" if change is not None else ""
    return f"{fmt(before)} → {fmt(after)}{percent}"


def phase_status(
    phase: str, done: int, total: int | None, width: int = 24, columns: int | None = None
) -> str:
    """The status line of a phase: a bar of samples (or what the phase counts:
    ``progress.counts``) done out of ``total``, or the count alone where the total is not
    known (a reader object) or the phase reads others. The statistics engine's phases
    (``progress.PHASES``, after a purpose: "bias correction: statistics") read as
    calibration; others' (the sensitivity report's runs, the check's) as they are named.
    ``columns``: the terminal's width, which a narrower bar keeps the line within (down to
    6)."""
    what = f"calibrating ({phase})" if progress.calibrates(phase) else phase
    unit = progress.counts(phase)
    if not unit:
        return f"{what}..."
    if total is None or total <= 0 or done > total:
        return f"{what}: {counted(done, unit)}..."
    count = f"{done}/{total} {unit}s"
    if columns is not None:  # the spinner and the spaces take 4, and a column is spare
        width = max(6, min(width, columns - len(what) - len(count) - 5))
    filled = round(width * done / total)
    bar = "━" * filled + "─" * (width - filled)
    return f"{what} {bar} {count}"


def summary_table(result: ShrinkResult) -> Table:
    """Per pass and total: time, nodes, params, MACs, bytes before -> after. The total's time
    is the compile's (load, passes, calibration, accounting, save): the check and the
    sensitivity report give their own."""
    table = Table(title="onnx-shrink summary", title_justify="left")
    table.add_column("pass", overflow="fold")  # a long op type wraps, not cut
    for column in ("time", "nodes", "params", "MACs/sample", "bytes"):
        table.add_column(column, justify="right")
    for step in result.steps:
        b, a = step.before, step.after
        spec = step.spec
        note = " (rolled back)" if step.rolled_back else ("" if step.modified else " (no change)")
        if step.note:
            note += f" [{step.note}]"
        if step.verdict and step.changed:  # --verify-each kept it
            note += f" [verified: {step.verdict}]"
        target = result.target_of(step)
        if target is not None:  # its time is not the pass's own: the search ran first
            # As given: the exclusions the search added are listed under the table.
            spec = target.spec
            note += f" [quant.max_error search {step.prepare_seconds:.1f}s]"
        if step.calibration_samples:  # not a data-aware pass that asked for nothing
            note += (
                f" [calibrated on {counted(step.calibration_samples, 'sample')} in "
                f"{step.calibration_seconds:.1f}s"
            )
            if step.probes:  # lowrank's ranks: 44 s of a 68 s run read as calibration
                note += f"; output error of {counted(step.probes, 'trial')} in "
                note += f"{step.probe_seconds:.1f}s"
            note += "]"
        table.add_row(
            escape(spec + note),
            f"{step.seconds:.2f}s",
            _arrow(b.nodes, a.nodes, str),
            _arrow(b.params, a.params),
            _macs_arrow(b, a),
            _arrow(step.bytes_before, step.bytes_after, human_bytes),
        )
    first, last = result.steps[0].before, result.steps[-1].after
    table.add_section()
    table.add_row(
        "total",
        f"{result.compile_seconds:.2f}s",
        _arrow(first.nodes, last.nodes, str),
        _arrow(first.params, last.params),
        _macs_arrow(first, last),
        _arrow(result.input_bytes, result.output_bytes, human_bytes),
        style="bold",
    )
    table.caption = rising_bounds(result.steps)
    return table


def _num(x: float) -> str:
    return "inf" if x == float("inf") else ("-inf" if x == float("-inf") else f"{x:.3g}")


def _known(x: float) -> str:
    """``_num``, or "?" for NaN: a figure nothing measured (upstream of pruned channels)."""
    return "?" if x != x else _num(x)


def check_tables(report: CheckReport) -> list[Table]:
    """The numerics table, the per-layer table (with --layers) and the speed/size table."""
    tables = [numeric_table(report.numeric, report.provider, report.seconds, report.notes())]
    if report.layers is not None:
        tables.append(layers_table(report.layers))
    tables.append(speed_table(report))
    if report.time_by_op is not None and report.latency is not None:
        tables.append(op_time_table(report.time_by_op, report.latency.reference.batch))
    return tables


def numeric_table(
    numeric: NumericReport,
    provider: str,
    seconds: float | None = None,
    notes: list[str] | None = None,
) -> Table:
    """Per-output error, cosine, SNR and NaN/Inf; accuracy with labels; the verdict; the
    check's time where given; ``notes`` under it (None: ``check_notes``' on the numbers
    alone)."""
    verdict = numeric.verdict
    took = f", {seconds:.1f}s" if seconds else ""
    title = escape(
        f"check on {provider} ({counted(numeric.samples, 'sample')}, {numeric.data}{took}): "
        f"{verdict}"
    )
    table = Table(title=title, title_justify="left")
    columns = (
        "output",
        "max abs err",
        "mean abs err",
        "rel err",
        "cosine",
        "SNR dB",
        "NaN/Inf",
        "top-1 agree",
        "equal",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in numeric.outputs:
        table.add_row(
            escape(out.name),
            _num(out.max_abs_error),
            _num(out.mean_abs_error),
            _num(out.relative_error),
            # Ids (tags, class ids) are judged by "equal": their cosine and SNR mean nothing.
            "—" if out.integral else f"{out.cosine:.6f}",
            "—" if out.integral else _num(out.snr_db),
            f"{out.nan_count}/{out.inf_count}",
            "" if out.top1_agreement is None else f"{out.top1_agreement:.2%}",
            "" if out.agreement is None else f"{out.agreement:.2%}",
        )
    if numeric.reference_accuracy is not None:
        table.add_section()
        table.add_row(
            "accuracy",
            f"{numeric.reference_accuracy:.2%} → {numeric.candidate_accuracy:.2%}",
            style="bold",
        )
    for failure in numeric.failures:
        table.add_row(f"[red]FAIL[/red] {escape(failure)}")
    if notes is None:
        notes = check_notes.notes(numeric)
    if notes:
        table.caption = escape("\n".join(notes))
    return table


def layers_table(layers: LayerReport, top: int = 10) -> Table:
    """The first error jump, then the tensors with the largest relative error."""
    jump = layers.first_jump
    head = "no error jump above the threshold"
    if jump:
        node = " ".join(part for part in (jump.op_type, jump.node) if part)  # unnamed: op type
        head = (
            f"first error jump: {jump.tensor} ({node}), relative error "
            f"{_num(jump.relative_error)} from {_num(jump.upstream_relative_error)} upstream"
        )
    if layers.reshaped:  # pruned channels: what they feed has no known upstream ("?")
        if not jump:
            head = "no error jump among the tensors compared"
        head += f"; {layers.reshaped} tensors the candidate gave another shape were not compared"
    table = Table(
        title=escape(f"per-layer error over {counted(layers.samples, 'sample')}; {head}"),
        title_justify="left",
    )
    for column in ("#", "tensor", "op", "rel err", "upstream", "cosine", "SNR dB"):
        table.add_column(column, justify="left" if column in ("tensor", "op") else "right")
    by_name = {layer.tensor: layer for layer in layers.layers}
    for name in layers.ranked[:top]:
        layer = by_name[name]
        table.add_row(
            str(layer.position),
            escape(name),
            escape(layer.op_type),
            _num(layer.relative_error),
            _known(layer.upstream_relative_error),
            f"{layer.cosine:.6f}",
            _num(layer.snr_db),
        )
    return table


def sensitivity_lines(
    report: SensitivityReport, top: int = 10, hint: int = HINT_LAYERS
) -> list[object]:
    """The layers that hurt most when quantized alone, worst first, then the exclusion hint."""
    runs = counted(report.runs, "run")
    title = (
        f"quantization sensitivity: {len(report.layers)} layers, each quantized alone "
        f"({counted(report.samples, 'sample')}, {report.data}, {runs}, {report.seconds:.1f}s)"
    )
    table = Table(title=escape(title), title_justify="left")
    for column in ("#", "node", "op", "rel err", "cosine", "SNR dB", "worst output"):
        table.add_column(column, justify="left" if column in ("node", "op") else "right")
    for rank, layer in enumerate(report.layers[:top], 1):
        table.add_row(
            str(rank),
            Text(layer.label),
            layer.op_type,
            _num(layer.relative_error),
            f"{layer.cosine:.6f}",
            _num(layer.snr_db),
            Text(layer.output + (f" ({layer.nonfinite} NaN/Inf)" if layer.nonfinite else "")),
        )
    lines: list[object] = [table]
    screening = report.screening_note()
    if screening is not None:
        lines.append(Text(f"note: {screening}"))
    k = min(hint, len(report.layers))
    caption = report.hint_caption(k) if k else None
    if caption is not None:
        lines.append(Text(caption))
        if report.hint_effect is not None:
            lines.append(Text(report.hint_effect.summary()))
    lines += [Text(f"note: {note}") for note in report.hint_notes(k)]
    if report.unmeasured:
        lines.append(Text(f"not measured (name shared): {', '.join(report.unmeasured)}"))
    return lines


def target_lines(outcome: TargetOutcome) -> list[object]:
    """What a quant pass's accuracy target found, and the option that keeps the same layers
    float without searching again."""
    lines: list[object] = [Text(outcome.summary())]
    option = outcome.exclude_option()
    if option is not None:
        lines.append(
            Text(f"the same model without the search (in place of quant.max_error): {option}")
        )
    return lines


def speed_table(report: CheckReport) -> Table:
    """Latency of both models (timed alternately) and their sizes on disk and zipped."""
    table = Table(title="speed and size", title_justify="left")
    for column in ("", "reference", "candidate", "ratio"):
        table.add_column(column, justify="left" if not column else "right")
    if report.latency is not None:
        ref, cand = report.latency.reference, report.latency.candidate
        asked = report.latency.pairs_asked
        cut = f", {ref.runs} of {asked} pairs (time budget)" if ref.runs < asked else ""
        # The ratio is the median over pairs of back-to-back runs, which cancels drift; it can
        # differ from the ratio of the two medians on a noisy machine.
        table.add_row(
            f"latency p50 (batch {ref.batch})",
            f"{ref.p50_ms:.3f} ms",
            f"{cand.p50_ms:.3f} ms",
            f"{report.latency.ratio:.2f}x paired{cut}",
        )
        table.add_row("latency p90", f"{ref.p90_ms:.3f} ms", f"{cand.p90_ms:.3f} ms", "")
        table.caption = _latency_caption(report.latency, report.time_by_op is not None)
    rs, cs = report.reference_size, report.candidate_size
    table.add_row(
        "bytes on disk",
        human_bytes(rs.bytes_on_disk),
        human_bytes(cs.bytes_on_disk),
        f"{cs.bytes_on_disk / rs.bytes_on_disk:.2f}x",
    )
    table.add_row(
        "bytes zipped",
        rs.zipped_text(human_bytes),
        cs.zipped_text(human_bytes),
        f"{cs.zipped_bytes / rs.zipped_bytes:.2f}x",
    )
    return table


def _latency_caption(latency: LatencyComparison, profiled: bool) -> str | None:
    """What the ratio says of a candidate ``bench.SLOWER_RATIO`` times faster or slower: too
    few pairs to say, either way (a pruned ResNet, whose dense kernels skip no zero, read
    "0.60x paired" on one pair with no caveat); else of a slower one, slower where it lost
    most pairs (``profiled``: the table of where the time goes follows), or that the timing
    is too noisy to say."""
    faster = latency.ratio <= 1 / bench.SLOWER_RATIO
    if latency.ratio < bench.SLOWER_RATIO and not (faster and latency.too_few_pairs):
        return None
    if latency.too_few_pairs:
        return (
            f"the {latency.ratio:.2f}x ratio rests on "
            f"{counted(latency.reference.runs, 'timing pair')}, too few for a verdict; time it "
            f"again with --runs {bench.MIN_TIMED_PAIRS} or more"
        )
    if not latency.slower:
        return (
            f"the {latency.ratio:.2f}x ratio is noise, not a verdict: the candidate was slower "
            f"in {latency.slower_share:.0%} of the pairs only (another load on the machine?); "
            "time it again with --runs, on a quiet machine"
        )
    where = (
        "the table below shows where its time goes"
        if profiled
        else "integer kernels on small layers, a lost fusion"
    )
    return (
        f"the candidate is slower here ({latency.ratio:.2f}x the reference's latency): a "
        f"compressed model does not run faster everywhere ({where}); measure it where it will "
        "run"
    )


TOP_OP_TIMES = 8
"""Op types the time table lists one by one; the rest are summed as "other"."""


def op_time_table(times: OpTimeComparison, batch: int) -> Table:
    """Kernel time by op type in both models (onnxruntime's profiler), the slowest first,
    then by kind (``op_time.KINDS``); the caption names the float ops the candidate adds."""
    ref, cand = times.reference, times.candidate
    table = Table(
        title=f"where the time goes (onnxruntime's profiler, batch {batch}, mean of "
        f"{counted(cand.runs, 'run')})",
        title_justify="left",
    )
    for column in ("op type", "kind", "reference", "candidate"):
        table.add_column(column, justify="left" if column in ("op type", "kind") else "right")
    ops = times.op_types()

    def cell(model: OpTimes, op_type: str) -> str:
        op = model.get(op_type)
        return "" if op is None else f"{op.ms:.3f} ms ({op.nodes})"

    for op_type in ops[:TOP_OP_TIMES]:
        table.add_row(op_type, op_time.kind(op_type), cell(ref, op_type), cell(cand, op_type))
    rest = ops[TOP_OP_TIMES:]
    if rest:
        ref_ms, cand_ms = ref.ms_by_op(), cand.ms_by_op()
        table.add_row(
            f"{len(rest)} other op types",
            "",
            f"{sum(ref_ms.get(t, 0.0) for t in rest):.3f} ms",
            f"{sum(cand_ms.get(t, 0.0) for t in rest):.3f} ms",
        )
    table.add_section()
    for kind, ref_kind_ms, cand_kind_ms in times.by_kind():
        table.add_row(f"{kind} kernels", "", f"{ref_kind_ms:.3f} ms", f"{cand_kind_ms:.3f} ms")
    table.add_row("total", "", f"{ref.total_ms:.3f} ms", f"{cand.total_ms:.3f} ms", style="bold")
    table.caption = _added_float_ops(times)
    return table


def _added_float_ops(times: OpTimeComparison) -> str | None:
    """The float op types the candidate runs more of than the reference (a quantized
    model's float ops between a DequantizeLinear and a QuantizeLinear), most time first."""
    added = []
    for op in times.candidate.ops:
        before = times.reference.get(op.op_type)
        extra_nodes = op.nodes - (before.nodes if before else 0)
        extra_ms = op.ms - (before.ms if before else 0.0)
        if op.kind == "float" and extra_nodes > 0 and extra_ms > 0:
            added.append(f"{op.op_type} +{extra_nodes} ({extra_ms:.3f} ms)")
    if not added:
        return None
    return (
        "float kernels the candidate runs and the reference does not (fused into its "
        f"kernels, or absent): {', '.join(added[:4])}; a float op between integer kernels "
        "costs its own time and a QuantizeLinear and DequantizeLinear around it"
    )


def benchmark_table(report: BenchmarkReport) -> Table:
    """Latency grid (batch x threads) with throughput, then memory and size."""
    table = Table(
        title=escape(f"benchmark of {report.model} on {report.provider} ({report.inputs})"),
        title_justify="left",
    )
    for column in ("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "samples/s"):
        table.add_column(column, justify="right")
    for row in report.latency:
        table.add_row(
            str(row.batch),
            "default" if row.threads is None else str(row.threads),
            f"{row.p50_ms:.3f}",
            f"{row.p90_ms:.3f}",
            f"{row.p99_ms:.3f}",
            f"{row.throughput:.1f}",
        )
    table.add_section()
    if report.peak_memory_bytes is not None:
        at = f" (batch {report.peak_memory_batch})" if report.peak_memory_batch else ""
        table.add_row(f"session peak memory{at}", "", human_bytes(report.peak_memory_bytes))
    table.add_row("bytes on disk", "", human_bytes(report.size.bytes_on_disk))
    table.add_row("bytes zipped", "", report.size.zipped_text(human_bytes))
    return table


def pass_list_tables(pass_classes: Iterable[type]) -> list[Table]:
    """One table per pass: its options with types, defaults and docs (from the dataclass)."""
    tables = []
    for cls in pass_classes:
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table = Table(title=escape(f"{cls.name}: {doc}"), title_justify="left", show_edge=False)
        for column in ("option", "type", "default", "meaning"):
            table.add_column(column)
        for info in options_mod.option_infos(cls):
            table.add_row(
                *(escape(t) for t in (info.name, info.type_name, repr(info.default))),
                escape(info.doc),
            )
        tables.append(table)
    return tables


def print_all(console: Console, renderables: Iterable[object]) -> None:
    # soft_wrap: a line of text (a --set hint to copy) is never broken by inserted newlines.
    for item in renderables:
        console.print(item, soft_wrap=isinstance(item, (str, Text)))
