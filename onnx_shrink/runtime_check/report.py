"""The self-contained HTML report: tables plus inline SVG plots, no scripts, no external URLs.

``html_report`` renders whichever of a shrink run, a check and a benchmark it is given. The
page is one file a person can mail or attach to an issue: CSS inline, charts as inline SVG
(``svg.py``) with tooltips, every name from a model escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from onnx_shrink.compiler.stats import rising_bounds
from onnx_shrink.runtime_check import report_speed, svg
from onnx_shrink.runtime_check.accuracy_target import TargetOutcome
from onnx_shrink.runtime_check.bench import BenchmarkReport
from onnx_shrink.runtime_check.checker import CheckReport
from onnx_shrink.runtime_check.layers import LayerReport
from onnx_shrink.runtime_check.numeric_report import NumericReport
from onnx_shrink.runtime_check.report_cells import (
    change,
    decimal_bytes,
    escape,
    html_table,
    number,
    pct,
    short_count,
)
from onnx_shrink.runtime_check.sensitivity_report import HINT_LAYERS, SensitivityReport
from onnx_shrink.wording import counted

if TYPE_CHECKING:
    from onnx_shrink.api import ShrinkResult
    from onnx_shrink.compiler.stats import ModelStats

TOP_TENSORS = 15

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif;
  color: #222; max-width: 960px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 28px 0 8px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f5; } td.name, th.name { text-align: left; word-break: break-all; }
code { font-size: 12.5px; background: #f3f3f3; padding: 1px 4px; border-radius: 3px;
  word-break: break-all; }
.badge { display: inline-block; padding: 3px 12px; border-radius: 12px; color: #fff;
  font-weight: 700; letter-spacing: .5px; vertical-align: middle; margin-left: 8px; }
.pass { background: #2e7d32; } .fail { background: #c62828; } .measured { background: #616161; }
.failures { color: #c62828; } .muted { color: #666; }
svg { display: block; max-width: 100%; height: auto; margin: 8px 0; }
"""


def html_report(
    *,
    shrink: ShrinkResult | None = None,
    check: CheckReport | None = None,
    bench: BenchmarkReport | None = None,
) -> str:
    """A complete standalone HTML document for a shrink run, a check and/or a benchmark.

    A shrink run's ``verification`` is rendered as its check unless ``check`` is given. At
    least one argument is required (ValueError otherwise).
    """
    if shrink is None and check is None and bench is None:
        raise ValueError("html_report needs a shrink result, a check report or a benchmark")
    if check is None and shrink is not None:
        check = shrink.verification
    body = [_header(shrink, check, bench)]
    if shrink is not None:
        body.append(_shrink_section(shrink))
        if shrink.accuracy_targets:
            body.append(_target_section(shrink.accuracy_targets))
        if shrink.sensitivity is not None:
            body.append(_sensitivity_section(shrink.sensitivity))
    if check is not None:
        body += _check_sections(check)
    if bench is not None:
        body.append(report_speed.bench_section(bench))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>onnx-shrink report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _macs(stats: ModelStats) -> str:
    """MACs, "≥" where the count is a lower bound (``ModelStats.nodes_without_macs``)."""
    return ("≥" if stats.nodes_without_macs else "") + short_count(stats.macs)


def _header(
    shrink: ShrinkResult | None, check: CheckReport | None, bench: BenchmarkReport | None
) -> str:
    parts = ["<header>"]
    badge = ""
    if check is not None:
        numeric = check.numeric
        kind = "fail" if numeric.failures else "pass" if numeric.tolerances.any else "measured"
        badge = f'<span class="badge {kind}">{escape(numeric.verdict)}</span>'
    parts.append(f"<h1>onnx-shrink report{badge}</h1>")
    if shrink is not None:
        specs = ", ".join(step.spec for step in shrink.steps) or "no passes"
        parts.append(
            f"<p>Passes <code>{escape(specs)}</code> in {shrink.compile_seconds:.2f} s: "
            f"{decimal_bytes(shrink.input_bytes)} → {decimal_bytes(shrink.output_bytes)} on disk"
            + (
                f", written to <code>{escape(shrink.output_path)}</code>"
                if shrink.output_path
                else ""
            )
            + ".</p>"
        )
    if check is not None:
        parts.append(_compared(check))
    if bench is not None:
        parts.append(
            f"<p>Benchmark of <code>{escape(bench.model)}</code> on {escape(bench.provider)}, "
            f"inputs {escape(bench.inputs)}.</p>"
        )
    parts.append("</header>")
    return "\n".join(parts)


def _compared(check: CheckReport) -> str:
    numeric = check.numeric
    data = "synthetic inputs" if numeric.synthetic else f"<code>{escape(numeric.data)}</code>"
    text = (
        f"<p>Candidate <code>{escape(check.candidate)}</code> against reference "
        f"<code>{escape(check.reference)}</code> on {escape(check.provider)}, "
        f"{counted(numeric.samples, 'sample')} from {data}.</p>"
    )
    notes = check.notes()  # whatever the verdict says: branches not run, ...
    if notes:
        items = "".join(f"<li>{escape(line[0].upper() + line[1:])}</li>" for line in notes)
        text += f'<ul class="failures">{items}</ul>'
    if numeric.failures:
        items = "".join(f"<li>{escape(f)}</li>" for f in numeric.failures)
        text += f'<ul class="failures">{items}</ul>'
    elif not numeric.tolerances.any:
        text += (
            '<p class="muted">No tolerances were given: these are measurements, not a verdict '
            "(only NaN/Inf where the reference is finite would fail).</p>"
        )
    else:
        text += '<p class="muted">Every output is within the tolerances.</p>'
        if numeric.accuracy_unmeasured:
            text += (
                '<p class="muted">Accuracy was not measured: no labels an output could be '
                "scored on.</p>"
            )
    return text


def _shrink_section(shrink: ShrinkResult) -> str:
    rows = []
    for step in shrink.steps:
        status = "rolled back" if step.rolled_back else "changed" if step.modified else "no change"
        if step.verdict:
            status += f": {step.verdict}"
        if step.note:
            status += f" ({step.note})"
        given = step.spec
        target = shrink.target_of(step)
        if target is not None:  # as given; the exclusions it ran with are listed below
            given = target.spec
            status += f" (after a quant.max_error search of {step.prepare_seconds:.1f} s)"
        rows.append(
            [
                f"<code>{escape(given)}</code>",
                escape(status),
                f"{step.seconds:.3f} s",
                change(step.before.nodes, step.after.nodes),
                change(step.before.params, step.after.params),
                change(step.before, step.after, _macs),
                change(step.bytes_before, step.bytes_after, decimal_bytes),
            ]
        )
    header = ["pass", "result", "time", "nodes", "params", "MACs", "bytes on disk"]
    bounds = rising_bounds(shrink.steps)
    note = f'<p class="muted">{escape(bounds)}</p>\n' if bounds else ""
    table = html_table(header, rows, names=2)
    return f"<section>\n<h2>Passes</h2>\n{table}\n{note}</section>"


def _target_section(outcomes: Sequence[TargetOutcome]) -> str:
    """What each quant pass's accuracy target (``quant.max_error``) kept float."""
    notes = []
    for outcome in outcomes:
        notes.append(escape(outcome.summary()))
        option = outcome.exclude_option()
        if option is not None:
            notes.append(
                "The same model without the search (in place of quant.max_error): "
                f"<code>{escape(option)}</code>"
            )
    paragraphs = "".join(f"<p>{note}</p>\n" for note in notes)
    return f"<section>\n<h2>Accuracy target</h2>\n{paragraphs}</section>"


def _sensitivity_section(
    report: SensitivityReport, top: int = TOP_TENSORS, hint: int = HINT_LAYERS
) -> str:
    """What the console prints for ``--sensitivity``: the layers worst first, the hint."""
    runs = counted(report.runs, "run")
    intro = (
        f"{len(report.layers)} layers, each quantized alone, compared at the model's outputs "
        f"({counted(report.samples, 'sample')}, {escape(report.data)}, {runs}, "
        f"{report.seconds:.1f} s)."
    )
    rows = [
        [
            str(rank),
            f"<code>{escape(layer.label)}</code>",
            escape(layer.op_type),
            number(layer.relative_error),
            number(layer.cosine, 6),
            number(layer.snr_db, 3),
            escape(layer.output + (f" ({layer.nonfinite} NaN/Inf)" if layer.nonfinite else "")),
        ]
        for rank, layer in enumerate(report.layers[:top], 1)
    ]
    header = ["#", "node", "op", "relative", "cosine", "SNR dB", "worst output"]
    k = min(hint, len(report.layers))
    words = report.hint_words(k) if k else None
    screening = report.screening_note()
    notes = [] if screening is None else [escape(screening.capitalize())]
    if words is not None:
        notes.append(f"{escape(words.capitalize())}: <code>{escape(report.exclude_hint(k))}</code>")
    if words is not None and report.hint_effect is not None:
        notes.append(escape(report.hint_effect.summary().capitalize()))
    notes += [escape(note) for note in report.hint_notes(k)]
    if report.unmeasured:
        notes.append(f"Not measured (name shared): {escape(', '.join(report.unmeasured))}")
    paragraphs = "".join(f"<p>{note}</p>\n" for note in notes)
    return (
        f"<section>\n<h2>Quantization sensitivity</h2>\n<p>{intro}</p>\n"
        f"{html_table(header, rows, names=3)}\n{paragraphs}</section>"
    )


def _check_sections(check: CheckReport) -> list[str]:
    sections = [_numeric_section(check.numeric)]
    if check.layers is not None:
        sections.append(_layers_section(check.layers))
    if check.latency is not None:
        sections.append(report_speed.latency_section(check.latency))
        if check.time_by_op is not None:
            sections.append(
                report_speed.time_section(check.time_by_op, check.latency.reference.batch)
            )
    sections.append(report_speed.bytes_section(check))
    return sections


def _numeric_section(numeric: NumericReport) -> str:
    rows = [
        [
            f"<code>{escape(o.name)}</code>",
            number(o.max_abs_error),
            number(o.mean_abs_error),
            number(o.relative_error),
            number(None if o.integral else o.cosine, 6),  # ids: "elements equal" judges them
            number(None if o.integral else o.snr_db, 3),
            f"{o.nan_count} / {o.inf_count}",
            pct(o.top1_agreement),
            pct(o.agreement),
        ]
        for o in numeric.outputs
    ]
    header = ["output", "max abs", "mean abs", "relative", "cosine", "SNR dB", "NaN / Inf"]
    header += ["top-1 agreement", "elements equal"]
    parts = ["<section>\n<h2>Numerics</h2>", html_table(header, rows)]
    if numeric.reference_accuracy is not None or numeric.candidate_accuracy is not None:
        ref, cand = numeric.reference_accuracy, numeric.candidate_accuracy
        drop = f"{100 * (ref - cand):.2f} points" if ref is not None and cand is not None else "—"
        parts.append(
            html_table(
                ["accuracy", "reference", "candidate", "drop"],
                [["top-1", pct(ref), pct(cand), drop]],
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


def _layers_section(report: LayerReport) -> str:
    if not report.layers:
        return "<section>\n<h2>Per-layer error</h2>\n<p>No tensor matched.</p>\n</section>"
    jump = report.first_jump
    where = (
        f"Error is born at <code>{escape(jump.tensor)}</code> ({escape(jump.op_type)}, position "
        f"{jump.position}): keep it out of compression or in higher precision."
        if jump
        else "No layer jumps above the threshold."
    )
    if any(not x.relative_error > 0 for x in report.layers):
        where += " Hollow points: zero error (at the bottom) or NaN/∞ (at the top)."
    by_name = {x.tensor: x for x in report.layers}
    ranked = [by_name[name] for name in report.ranked if name in by_name][:TOP_TENSORS]
    rows = [
        [
            f"<code>{escape(x.tensor)}</code>",
            escape(x.op_type),
            str(x.position),
            number(x.relative_error),
            number(x.upstream_relative_error),
            number(x.cosine, 6),
            number(x.snr_db, 3),
        ]
        for x in ranked
    ]
    header = ["tensor", "op", "position", "relative", "upstream", "cosine", "SNR dB"]
    reshaped = (
        f", {report.reshaped} of another shape in the candidate (upstream of what they feed: "
        "unknown)"
        if report.reshaped
        else ""
    )
    return (
        f"<section>\n<h2>Per-layer error</h2>\n<p>{where} {counted(report.samples, 'sample')}, "
        f"{len(report.layers)} tensors compared, {report.unmatched} unmatched"
        f"{reshaped}.</p>\n"
        f"{_layer_chart(report)}\n<h3>Top {len(ranked)} tensors by error</h3>\n"
        f"{html_table(header, rows, names=2)}\n</section>"
    )


def _layer_chart(report: LayerReport) -> str:
    """Plot A: relative error per tensor in graph order, coloured by op type, first jump ringed."""
    positive = [x.relative_error for x in report.layers if x.relative_error > 0]
    op_types = list(dict.fromkeys(x.op_type for x in report.layers))
    points = [
        svg.Point(
            x=layer.position,
            y=layer.relative_error,
            group=layer.op_type,
            tip=f"#{layer.position} {layer.tensor} ({layer.op_type}): relative error "
            f"{number(layer.relative_error)}, upstream {number(layer.upstream_relative_error)}",
            label=f"first jump: {_short(layer.tensor)}" if layer == report.first_jump else None,
        )
        for layer in report.layers
    ]
    return svg.log_scatter(
        points,
        title="Per-layer error along the graph",
        x_label="position in graph order",
        y_label="relative error (log)",
        floor=max(min([*positive, report.jump_threshold]) / 10, 1e-12),
        colors={op: svg.PALETTE[i % len(svg.PALETTE)] for i, op in enumerate(op_types)},
        threshold=svg.Marker(
            report.jump_threshold, f"jump threshold {report.jump_threshold:g}", "#888"
        ),
    )


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
