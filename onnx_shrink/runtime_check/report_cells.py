"""Cells of the HTML report (``report``): numbers and names formatted, tables, colors."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from onnx_shrink.runtime_check import svg

REFERENCE_COLOR, CANDIDATE_COLOR = svg.PALETTE[0], svg.PALETTE[1]


def escape(text: object) -> str:
    return html.escape(str(text))


def number(value: float | None, digits: int = 4) -> str:
    """A float for a table cell: ``∞`` for infinities, ``—`` for None."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def decimal_bytes(count: float) -> str:
    """Decimal units (kB = 1000 B), so 1-2-5 axis ticks read as round numbers."""
    for threshold, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(count) >= threshold:
            return f"{count / threshold:.4g} {unit}"
    return f"{count:.0f} B"


def short_count(n: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / threshold:.3g}{suffix}"
    return f"{n:.0f}"


def millis(value: float) -> str:
    return f"{value:.3g} ms"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def change(before: Any, after: Any, fmt: Callable[[Any], str] = short_count) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]], names: int = 1) -> str:
    """A table whose first ``names`` columns are left-aligned text; cells are already HTML."""

    def row(cells: Sequence[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="name">{c}</{tag}>' if i < names else f"<{tag}>{c}</{tag}>"
            for i, c in enumerate(cells)
        )

    lines = [f"<tr>{row([escape(h) for h in header], 'th')}</tr>"]
    lines += [f"<tr>{row(cells, 'td')}</tr>" for cells in rows]
    return "<table>\n" + "\n".join(lines) + "\n</table>"
