"""The HTML report's speed and size sections: latency, where the time goes, bytes, benchmark."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from onnx_shrink.runtime_check import svg
from onnx_shrink.runtime_check.bench import BenchmarkReport, LatencyComparison, LatencyStats
from onnx_shrink.runtime_check.checker import CheckReport
from onnx_shrink.runtime_check.op_time import OpTimeComparison, largest_first
from onnx_shrink.runtime_check.report_cells import (
    CANDIDATE_COLOR,
    REFERENCE_COLOR,
    decimal_bytes,
    escape,
    html_table,
    millis,
    short_count,
)

TOP_OP_TYPES = 12
"""Op types the charts by op type show one by one; the rest are summed as "other"."""


def latency_section(latency: LatencyComparison) -> str:
    ref, cand = latency.reference, latency.candidate
    both = (("reference", ref, REFERENCE_COLOR), ("candidate", cand, CANDIDATE_COLOR))
    markers = [
        svg.Marker(value, f"{who} p{q}", color)
        for who, stats, color in both
        for q, value in ((50, stats.p50_ms), (90, stats.p90_ms))
    ]
    chart = svg.overlaid_histograms(
        [svg.Series(who, stats.timings_ms, color) for who, stats, color in both],
        title=f"Latency distribution (batch {ref.batch}): candidate/reference = "
        f"{latency.ratio:.3f}×",
        x_label="milliseconds per run",
        markers=sorted(markers, key=lambda m: -m.value),
        fmt=millis,
        upper=max(
            _outlier_fence(ref.timings_ms),
            _outlier_fence(cand.timings_ms),
            *(m.value for m in markers),
        ),
    )
    rows = [_latency_row(name, s) for name, s in (("reference", ref), ("candidate", cand))]
    table = html_table(["model", "runs", "mean", "p50", "p90", "p99", "samples/s"], rows)
    return (
        "<section>\n<h2>Latency</h2>\n<p>Both models timed alternately in one process; the "
        f"ratio is the median of per-pair ratios.</p>\n{chart}\n{table}\n</section>"
    )


def _outlier_fence(timings: Sequence[float]) -> float:
    """Tukey's far-out fence, Q3 + 3 IQR: slower runs are outliers (a page fault, a GC)."""
    ordered = sorted(timings) or [0.0]
    q1, q3 = (ordered[round(q * (len(ordered) - 1))] for q in (0.25, 0.75))
    return q3 + 3 * (q3 - q1)


def _latency_row(name: str, stats: LatencyStats) -> list[str]:
    times = (stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)
    return [escape(name), str(stats.runs), *map(millis, times), short_count(stats.throughput)]


def time_section(times: OpTimeComparison, batch: int) -> str:
    """Where each model's time goes by op type (``op_time``), and by kind of kernel."""
    chart = _by_op_chart(
        times.reference.ms_by_op(),
        times.candidate.ms_by_op(),
        title=f"Kernel time by op type (onnxruntime's profiler, batch {batch})",
        x_label="milliseconds per run",
        fmt=millis,
    )
    rows = [
        [escape(f"{kind} kernels"), millis(ref_ms), millis(cand_ms)]
        for kind, ref_ms, cand_ms in times.by_kind()
    ]
    rows.append(["total", millis(times.reference.total_ms), millis(times.candidate.total_ms)])
    return (
        "<section>\n<h2>Where the time goes</h2>\n<p>The check found the candidate slower, "
        f"so both models ran {times.candidate.runs} more times under onnxruntime's profiler. "
        "Conversions are QuantizeLinear and DequantizeLinear; layout kernels the Transposes "
        "and reorders onnxruntime inserts.</p>\n"
        f"{chart}\n{html_table(['kind', 'reference', 'candidate'], rows)}\n</section>"
    )


def _by_op_chart(
    ref: Mapping[str, float],
    cand: Mapping[str, float],
    *,
    title: str,
    x_label: str,
    fmt: Callable[[float], str],
) -> str:
    """Both models' values by op type as grouped bars: the ``TOP_OP_TYPES`` largest, the
    rest summed as "other"."""
    ops = largest_first(ref, cand)
    shown, rest = ops[:TOP_OP_TYPES], ops[TOP_OP_TYPES:]
    categories = shown + (["other"] if rest else [])

    def values(by_op: Mapping[str, float]) -> tuple[float, ...]:
        other = (sum(by_op.get(op, 0) for op in rest),) if rest else ()
        return tuple(float(by_op.get(op, 0)) for op in shown) + other

    return svg.grouped_hbars(
        categories,
        [
            svg.Series("reference", values(ref), REFERENCE_COLOR),
            svg.Series("candidate", values(cand), CANDIDATE_COLOR),
        ],
        title=title,
        x_label=x_label,
        fmt=fmt,
    )


def bytes_section(check: CheckReport) -> str:
    chart = _by_op_chart(
        check.reference_bytes_by_op,
        check.candidate_bytes_by_op,
        title="Bytes by op type, before and after",
        x_label="tensor bytes consumed by the op type",
        fmt=decimal_bytes,
    )
    sizes = [
        [escape(name), decimal_bytes(size.bytes_on_disk), size.zipped_text(decimal_bytes)]
        for name, size in (("reference", check.reference_size), ("candidate", check.candidate_size))
    ]
    table = html_table(["model", "on disk", "zipped"], sizes)
    return f"<section>\n<h2>Size</h2>\n{chart}\n{table}\n</section>"


def bench_section(bench: BenchmarkReport) -> str:
    def threads(stats: LatencyStats) -> str:
        return "default" if stats.threads is None else str(stats.threads)

    rows = [[str(s.batch), threads(s), *_latency_row("", s)[1:]] for s in bench.latency]
    header = ["batch", "threads", "runs", "mean", "p50", "p90", "p99", "samples/s"]
    chart = svg.grouped_hbars(
        [f"batch {s.batch}, threads {threads(s)}" for s in bench.latency],
        [svg.Series("p50", tuple(s.p50_ms for s in bench.latency), REFERENCE_COLOR)],
        title="Median latency per batch size and thread count",
        x_label="p50 milliseconds per run",
        fmt=millis,
    )
    memory = (
        "not measured"
        if bench.peak_memory_bytes is None
        else decimal_bytes(bench.peak_memory_bytes)
    )
    if bench.peak_memory_batch:
        memory += f" at batch {bench.peak_memory_batch}"
    return (
        f"<section>\n<h2>Benchmark</h2>\n{html_table(header, rows, names=0)}\n{chart}\n"
        f"<p>Session peak memory: {memory}. Size: {decimal_bytes(bench.size.bytes_on_disk)} on "
        f"disk, {bench.size.zipped_text(decimal_bytes)} zipped.</p>\n</section>"
    )
