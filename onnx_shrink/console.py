"""Terminal presentation: the summary table, the check table and the pass list (rich).

Only presentation lives here; every figure comes from the result objects unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from onnx_shrink.api import ShrinkResult
from onnx_shrink.compiler import options as options_mod
from onnx_shrink.runtime_check.verify import VerificationReport


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _arrow(before: float, after: float, fmt=human_count) -> str:
    if before == after:
        return fmt(before)
    change = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{fmt(before)} → {fmt(after)}{change}"


def summary_table(result: ShrinkResult) -> Table:
    """Per pass and total: time, nodes, params, MACs, bytes before -> after."""
    table = Table(title="onnx-shrink summary", title_justify="left")
    for column in ("pass", "time", "nodes", "params", "MACs/sample", "bytes"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for step in result.steps:
        b, a = step.before, step.after
        table.add_row(
            step.spec + ("" if step.modified else " (no change)"),
            f"{step.seconds:.2f}s",
            _arrow(b.nodes, a.nodes, str),
            _arrow(b.params, a.params),
            _arrow(b.macs, a.macs),
            _arrow(step.bytes_before, step.bytes_after, human_bytes),
        )
    first, last = result.steps[0].before, result.steps[-1].after
    table.add_section()
    table.add_row(
        "total",
        f"{result.seconds:.2f}s",
        _arrow(first.nodes, last.nodes, str),
        _arrow(first.params, last.params),
        _arrow(first.macs, last.macs),
        _arrow(result.input_bytes, result.output_bytes, human_bytes),
        style="bold",
    )
    return table


def check_table(report: VerificationReport) -> Table:
    """Per-output error and cosine, accuracy with labels, and the latency ratio."""
    numeric = report.numeric
    table = Table(title=f"check on {report.provider}: {numeric.data}", title_justify="left")
    for column in ("output", "max abs error", "mean abs error", "cosine", "ref max |x|"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in numeric.outputs:
        table.add_row(
            out.name,
            f"{out.max_abs_error:.3g}",
            f"{out.mean_abs_error:.3g}",
            f"{out.cosine:.6f}",
            f"{out.reference_max_abs:.3g}",
        )
    if numeric.reference_accuracy is not None:
        table.add_section()
        table.add_row(
            f"accuracy ({numeric.samples} samples)",
            f"{numeric.reference_accuracy:.2%} → {numeric.candidate_accuracy:.2%}",
        )
    if report.latency is not None:
        lat = report.latency
        table.add_section()
        table.add_row(
            f"latency (median of {lat.runs})",
            f"{lat.reference_ms:.3f} → {lat.candidate_ms:.3f} ms",
            f"ratio {lat.ratio:.2f}x",
        )
    return table


def pass_list_tables(pass_classes: Iterable[type]) -> list[Table]:
    """One table per pass: its options with types, defaults and docs (from the dataclass)."""
    tables = []
    for cls in pass_classes:
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table = Table(title=f"{cls.name}: {doc}", title_justify="left", show_edge=False)
        for column in ("option", "type", "default", "meaning"):
            table.add_column(column)
        for info in options_mod.option_infos(cls):
            table.add_row(info.name, info.type_name, repr(info.default), info.doc)
        tables.append(table)
    return tables


def print_all(console: Console, renderables: Iterable[object]) -> None:
    for item in renderables:
        console.print(item)
