"""Small, dependency-free SVG charts for the HTML report.

Every chart is a pure function from data to one standalone ``<svg>`` element (with the SVG
namespace, so each parses as XML on its own): axes with tick labels, a title, a legend where
there is more than one series, and a ``<title>`` tooltip on every point and bar. All text passes
through ``html.escape``; callers hand in plain strings. Charts draw at ``width`` user units and
scale down with the page (``viewBox``), so they stay readable at 1000 px.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Sequence

Formatter = Callable[[float], str]

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
"""Tableau 10: distinguishable, and readable for the common forms of colour blindness."""
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_HALO = {"stroke": "#fff", "stroke_width": "4", "paint_order": "stroke"}
"""A white outline under a label, so it stays legible over lines and points."""
_CHAR_PX = 6.6
"""Rough width of one 12 px character, for laying out labels without a font engine."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One scatter point; ``label`` set: ringed and labelled on the chart."""

    x: float
    y: float
    group: str
    tip: str
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class Series:
    """A named list of values drawn in one colour."""

    name: str
    values: tuple[float, ...]
    color: str


@dataclasses.dataclass(frozen=True)
class Marker:
    """A labelled vertical line at ``value`` (a percentile, a threshold)."""

    value: float
    label: str
    color: str


@dataclasses.dataclass(frozen=True)
class _Box:
    """The plot area in SVG user units."""

    left: float
    top: float
    right: float
    bottom: float


def general(value: float) -> str:
    """Three significant digits, no exponent between 1e-3 and 1e6."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    if 1e-3 <= abs(value) < 1e6:
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return f"{value:.2e}"


def linear_ticks(low: float, high: float, target: int = 6, min_step: float = 0.0) -> list[float]:
    """1-2-5 ticks whose first is <= ``low`` and last >= ``high`` (at least two ticks)."""
    if not high > low:
        high = low + (abs(low) or 1.0)
    raw = max((high - low) / target, min_step, 1e-300)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [k * step for k in range(first, max(last, first + 1) + 1)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """``value`` with as many decimals as the tick step needs."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:,.{decimals}f}"


def log_decades(low: float, high: float) -> list[int]:
    """Exponents of the powers of ten around [low, high] (both > 0), at least two."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return list(range(first, max(last, first + 1) + 1))


def power_of_ten(exponent: int) -> str:
    """``10⁻³`` for -3; plain ``1``, ``10`` for 0 and 1."""
    return {0: "1", 1: "10"}.get(exponent, "10" + str(exponent).translate(_SUPERSCRIPT))


def _e(text: object) -> str:
    return html.escape(str(text))


def _text(x: float, y: float, text: str, anchor: str = "start", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_e(text)}</text>'


def _frame(width: float, height: float, title: str, body: Sequence[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{_e(title)}" '
        f'font-family="{_e(FONT)}" font-size="12" fill="#222">'
    )
    heading = _text(width / 2, 20, title, "middle", font_size="15", font_weight="600")
    return "\n".join([head, f"<title>{_e(title)}</title>", heading, *body, "</svg>"])


def _legend(
    items: Sequence[tuple[str, str]], left: float, top: float, right: float
) -> tuple[list[str], float]:
    """Swatches in rows from (left, top) up to ``right``: (svg parts, height used)."""
    parts, x, y = [], left, top
    for label, color in items:
        width = 22 + _CHAR_PX * len(label)
        if x + width > right and x > left:
            x, y = left, y + 18
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="11" height="11" fill="{color}"/>')
        parts.append(_text(x + 15, y + 10, label))
        x += width + 14
    return parts, (y - top + 18 if items else 0)


def _axes(
    box: _Box,
    x_ticks: Sequence[tuple[float, str]],
    y_ticks: Sequence[tuple[float, str]],
    x_label: str,
    y_label: str,
) -> list[str]:
    """Grid lines, tick labels, the two axis lines and their titles; ticks in pixels."""
    parts = []
    for y, label in y_ticks:
        parts.append(
            f'<line x1="{box.left}" x2="{box.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
        )
        parts.append(_text(box.left - 6, y + 4, label, "end"))
    for x, label in x_ticks:
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{box.bottom}" y2="{box.bottom + 5}" '
            'stroke="#555"/>'
        )
        parts.append(_text(x, box.bottom + 18, label, "middle"))
    parts.append(
        f'<path d="M{box.left},{box.top} V{box.bottom} H{box.right}" fill="none" stroke="#555"/>'
    )
    parts.append(_text((box.left + box.right) / 2, box.bottom + 36, x_label, "middle"))
    mid = (box.top + box.bottom) / 2
    parts.append(_text(16, mid, y_label, "middle", transform=f"rotate(-90 16 {mid:.1f})"))
    return parts


def log_scatter(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    floor: float,
    colors: dict[str, str],
    threshold: Marker | None = None,
    width: float = 940,
    height: float = 400,
) -> str:
    """Points joined in x order on a log y axis, hollow where y is below ``floor`` (zeros: drawn
    at the floor) or not finite (NaN, inf: drawn at the top).

    ``colors`` maps each point's group to its colour and orders the legend; a ``threshold``
    draws a dashed horizontal line at its value. At most about ten decades are labelled.
    """
    legend, legend_h = _legend(list(colors.items()), 70, 34, width - 20)
    box = _Box(70, 44 + legend_h, width - 20, height - 48)
    ys = [max(p.y, floor) for p in points if math.isfinite(p.y)] or [floor]
    marks = [threshold.value] if threshold is not None and threshold.value > 0 else []
    decades = log_decades(min(ys + marks) / 3, max(ys + marks))  # a margin under the lowest
    xs = [p.x for p in points] or [0.0]
    x_ticks = linear_ticks(min(xs), max(xs), 10, min_step=1.0)

    def sx(x: float) -> float:
        span = (x_ticks[-1] - x_ticks[0]) or 1.0
        return box.left + 8 + (x - x_ticks[0]) / span * (box.right - box.left - 16)

    def sy(y: float) -> float:
        y = y if math.isfinite(y) else 10.0 ** decades[-1]
        fraction = (math.log10(max(y, floor)) - decades[0]) / (decades[-1] - decades[0])
        return box.bottom - fraction * (box.bottom - box.top)

    every = math.ceil(len(decades) / 10)

    parts = legend + _axes(
        box,
        [(sx(t), tick_label(t, x_ticks)) for t in x_ticks],
        [(sy(10.0**d), power_of_ten(d)) for d in decades[::every]],
        x_label,
        y_label,
    )
    if threshold is not None:
        parts += _threshold_line(box, sy(threshold.value), threshold)
    ordered = sorted(points, key=lambda p: p.x)
    placed = [(p, sx(p.x), sy(p.y)) for p in ordered]
    path = " ".join(f"{x:.1f},{y:.1f}" for _, x, y in placed)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#9a9a9a" stroke-width="1.2"/>')
    parts += [_dot(p, x, y, colors.get(p.group, "#777"), floor) for p, x, y in placed]
    parts += [_callout(box, x, y, p.label, p.tip) for p, x, y in placed if p.label is not None]
    return _frame(width, height, title, parts)


def _dot(point: Point, x: float, y: float, color: str, floor: float) -> str:
    """A filled circle, hollow where the value is below the floor or not finite."""
    hollow = point.y < floor or not math.isfinite(point.y)
    fill, stroke = ("#fff", color) if hollow else (color, "#fff")
    return (
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="{stroke}" '
        f'stroke-width="1.2"><title>{_e(point.tip)}</title></circle>'
    )


def _threshold_line(box: _Box, y: float, marker: Marker) -> list[str]:
    return [
        f'<line x1="{box.left}" x2="{box.right}" y1="{y:.1f}" y2="{y:.1f}" '
        f'stroke="{marker.color}" stroke-dasharray="6 4" stroke-width="1.3"/>',
        _text(box.left + 6, y - 5, marker.label, fill=marker.color, **_HALO),
    ]


def _callout(box: _Box, x: float, y: float, label: str | None, tip: str) -> str:
    """A ring around (x, y) and ``label`` below it (above near the axis), inside the plot."""
    anchor = "start" if x < (box.left + box.right) / 2 else "end"
    dx = 12 if anchor == "start" else -12
    text_y = y + 22 if y + 22 < box.bottom - 4 else y - 12
    return (
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#d62728" '
        f'stroke-width="2"><title>{_e(tip)}</title></circle>\n'
        + _text(x + dx, text_y, label or "", anchor, fill="#d62728", font_weight="600", **_HALO)
    )


def overlaid_histograms(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    markers: Sequence[Marker] = (),
    upper: float | None = None,
    fmt: Formatter = general,
    width: float = 940,
    height: float = 360,
) -> str:
    """Histograms of each series over shared bins, translucent so overlaps show.

    Values above ``upper`` (outliers) are counted in the last bin and the axis title says how
    many; ``fmt`` formats values in tooltips and in that note. ``markers`` (percentiles) are
    dashed vertical lines, their labels stacked so they do not collide. About twice the square
    root of the longest series' length in bins, 8 to 40.
    """
    values = [v for s in series for v in s.values if math.isfinite(v)] or [0.0]
    beyond = [v for v in values if upper is not None and v > upper]
    if beyond:
        runs = "1 slower run" if len(beyond) == 1 else f"{len(beyond)} slower runs"
        x_label += f" ({runs}, up to {fmt(max(beyond))}, counted in the last bin)"
    x_ticks = linear_ticks(min(values), max(values) if upper is None else upper, 8)
    low, high = x_ticks[0], x_ticks[-1]
    count = min(40, max(8, round(2 * math.sqrt(max(len(s.values) for s in series)))))
    edges = [low + (high - low) * i / count for i in range(count + 1)]
    histograms = [_counts(s.values, edges) for s in series]
    y_ticks = linear_ticks(0, max(max(h) for h in histograms) or 1, 5, min_step=1.0)
    legend, legend_h = _legend([(s.name, s.color) for s in series], 70, 34, width - 20)
    box = _Box(70, 50 + legend_h + 14 * len(markers), width - 20, height - 48)

    def sx(x: float) -> float:
        return box.left + (x - low) / ((high - low) or 1.0) * (box.right - box.left)

    def sy(y: float) -> float:
        return box.bottom - y / y_ticks[-1] * (box.bottom - box.top)

    parts = legend + _axes(
        box,
        [(sx(t), tick_label(t, x_ticks)) for t in x_ticks],
        [(sy(t), tick_label(t, y_ticks)) for t in y_ticks],
        x_label,
        "runs",
    )
    for s, counts in zip(series, histograms, strict=True):
        for i, n in enumerate(counts):
            if n:
                tip = f"{s.name}: {n} runs in {fmt(edges[i])}–{fmt(edges[i + 1])}"
                parts.append(_bar(sx(edges[i]), sy(n), sx(edges[i + 1]), box.bottom, s, tip))
    for i, marker in enumerate(markers):
        parts += _marker_line(box, sx(marker.value), box.top - 8 - 14 * i, marker)
    return _frame(width, height, title, parts)


def _bar(left: float, top: float, right: float, bottom: float, series: Series, tip: str) -> str:
    return (
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
        f'height="{bottom - top:.1f}" fill="{series.color}" fill-opacity="0.5" '
        f'stroke="{series.color}"><title>{_e(tip)}</title></rect>'
    )


def _marker_line(box: _Box, x: float, label_y: float, marker: Marker) -> list[str]:
    """A dashed vertical line from ``label_y`` down to the x axis, labelled at its top."""
    anchor = "start" if x < (box.left + box.right) / 2 else "end"
    return [
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{label_y + 4:.1f}" y2="{box.bottom}" '
        f'stroke="{marker.color}" stroke-dasharray="5 3" stroke-width="1.5">'
        f"<title>{_e(marker.label)}</title></line>",
        _text(
            x + (4 if anchor == "start" else -4),
            label_y,
            marker.label,
            anchor,
            fill=marker.color,
            **_HALO,
        ),
    ]


def _counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """How many values fall in each bin; the last bin also counts everything above it."""
    counts = [0] * (len(edges) - 1)
    low, high = edges[0], edges[-1]
    for v in values:
        if math.isfinite(v) and low <= v:
            index = int((v - low) / ((high - low) or 1.0) * len(counts))
            counts[min(index, len(counts) - 1)] += 1
    return counts


def grouped_hbars(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    fmt: Formatter = general,
    width: float = 940,
) -> str:
    """One group of horizontal bars per category, one bar per series, values labelled.

    Each series' ``values`` align with ``categories``; the x axis starts at zero. Long category
    names are shortened on the axis and given in full in the tooltips.
    """
    bar_h, gap = 14, 10
    label_w = min(240, 12 + _CHAR_PX * max((len(c) for c in categories), default=4))
    legend, legend_h = ([], 0)
    if len(series) > 1:
        legend, legend_h = _legend([(s.name, s.color) for s in series], label_w, 34, width - 20)
    top = 44 + legend_h
    group_h = bar_h * len(series) + gap
    height = top + group_h * max(len(categories), 1) + 50
    box = _Box(label_w, top, width - 90, height - 48)
    x_ticks = linear_ticks(0, max((v for s in series for v in s.values), default=1.0) or 1.0, 6)

    def sx(x: float) -> float:
        return box.left + x / x_ticks[-1] * (box.right - box.left)

    parts = legend + _axes(box, [(sx(t), fmt(t)) for t in x_ticks], [], x_label, "")
    for i, category in enumerate(categories):
        y0 = top + gap / 2 + i * group_h
        short = category if len(category) <= 34 else category[:32] + "…"
        parts.append(_text(box.left - 6, y0 + bar_h * len(series) / 2 + 4, short, "end"))
        for j, s in enumerate(series):
            value, y = s.values[i], y0 + j * bar_h
            tip = f"{category} — {s.name}: {fmt(value)}"
            parts.append(
                f'<rect x="{box.left}" y="{y:.1f}" width="{sx(value) - box.left:.1f}" '
                f'height="{bar_h - 2}" fill="{s.color}"><title>{_e(tip)}</title></rect>'
            )
            parts.append(_text(sx(value) + 4, y + bar_h - 4, fmt(value), font_size="11"))
    return _frame(width, height, title, parts)
