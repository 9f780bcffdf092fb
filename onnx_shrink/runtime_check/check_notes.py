"""What a check's numbers alone do not say, one line each: If branches no sample took, integer
outputs no tolerance judges, elements both models left NaN/Inf, an output the candidate
destroyed or changed much, and what an output adds to its input (``residuals``) destroyed.

The console prints the lines under its numeric table, the HTML report lists them under the
comparison, and the JSON report carries them (``notes``): a "large error" on a mel
spectrogram quantized to 5.8 dB SNR was on the console only, and the report files of the same
run read like any other.

A large error names the fix of each lossy pass that made the candidate, where the check knows
them (a shrink's): quant's advice after ``prune`` alone sent a user to an option of a pass
the pipeline did not have.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnx_shrink.runtime_check.numeric_report import LOW_AGREEMENT, NumericReport, OutputComparison

LOCATE = "--layers shows where the error first jumps"
SHOWN = 3  # large-error outputs named in the note

QUANT_FIX = (
    "--sensitivity ranks the layers that cost it, and --set quant.max_error=0.1 keeps the "
    "worst of them float until every output's relative error is within 0.1; equalize before "
    "quant evens out a channel far wider than the rest of its tensor"
)
FIXES = {
    "quant": QUANT_FIX,
    "quant-dynamic": "--set quant-dynamic.exclude=TENSOR keeps float the node that writes a "
    "tensor --layers names",
    "quant-weight": "--set quant-weight.bits=8, or a smaller quant-weight.block_size, keeps "
    "more of each weight",
    "fp16": "--set fp16.exclude=TENSOR keeps in float32 the node that writes a tensor "
    "--layers names",
    "prune": "a lower prune.sparsity zeroes fewer weights",
    "prune-channels": "a lower prune-channels.ratio removes fewer channels",
    "lowrank": "a lower lowrank.reduction removes less, and lowrank.selection=error bounds "
    "each layer's error by lowrank.max_error",
}
"""each lossy pass's first remedy for a large error, by pass name (tests hold the options
named here to the registry's)"""


def notes(numeric: NumericReport, passes: Sequence[str] | None = None) -> list[str]:
    """The notes on ``numeric``, the unchecked branches first; [] where there is none.

    ``passes``: the names of the passes that made the candidate, in order (a shrink's check);
    None where they are unknown (``onnx-shrink check``), where quant's fix is named as the
    likeliest."""
    lines = [f"not checked: {line}" for line in numeric.untested_branches]
    lines += _unjudged_integers(numeric)
    lines += _uncompared(numeric)
    ordered_by = dict(numeric.ordered_by)
    large = numeric.large_errors
    measured = (
        ", which quant.max_error and --sensitivity measure instead"
        if passes is None or "quant" in passes
        else ""
    )
    for worst in (o for o in large if o.name in ordered_by):
        # isbnx's TopK detector in fp16: 3.9 dB SNR with the same detections.
        lines.append(
            f"large error: {_kept(worst)}, but {ordered_by[worst.name]} chooses and orders its "
            "rows: near-equal scores trade places under any change, and rows compared element "
            "by element then count as error; --layers shows the error of the values it "
            f"chooses from{measured}"
        )
    plain = [o for o in large if o.name not in ordered_by]
    if plain:
        # Without tolerances the verdict only says "measured": a destroyed output (a mel
        # filterbank quantized: 6.7 dB, cosine 0.89) read like any other. The fix is named
        # too: on PicoDet's layout model (score cosine 0.86), max_error=0.15 gave 0.991.
        # Each such output is named: a spindle detector's pruned segmentation map (12.2 dB)
        # went unsaid beside its detection output (6.5 dB).
        named = ", ".join(_kept(o) for o in plain[:SHOWN])
        more = f", and {len(plain) - SHOWN} more outputs" if len(plain) > SHOWN else ""
        lines.append(f"large error: {named}{more}; {LOCATE}{_fixes(passes)}")
    for out in numeric.large_residual_errors:
        # RivaGAN's pruned watermark encoder: 0.0198 over the frame, 0.86 over what it adds.
        # flashvad's cache: one new frame beside 15 exact copies of the input's.
        what = (
            f"the new part of '{out.name}', input '{out.residual_of}' shifted ("
            f"{out.residual_shift}, {out.residual_share:.1%} of its norm): it keeps"
            if out.residual_shift
            else f"what '{out.name}' adds to input '{out.residual_of}' (a residual of "
            f"{out.residual_share:.1%} of its norm): the residual keeps"
        )
        lines.append(
            f"large error in {what} {out.residual_snr_db:.1f} dB SNR (relative error "
            f"{out.residual_error:.3g}), where the whole output keeps {out.snr_db:.1f} dB; "
            f"{LOCATE}{_fixes(passes)}"
        )
    for out in numeric.large_part_errors:
        # YOLOv8's output: 4 box rows in pixels beside a score row per class, 0.033 over the
        # output and 0.43 over the scores.
        lines.append(
            f"large error in part of '{out.name}' ({out.small_part}, {out.small_part_share:.2%} "
            f"of its norm): it keeps {out.small_part_snr_db:.1f} dB SNR (relative error "
            f"{out.small_part_error:.3g}), where the whole output keeps {out.snr_db:.1f} dB, "
            f"its large part hiding it; {LOCATE}{_fixes(passes)}"
        )
    changed = numeric.low_agreement
    if changed is not None:
        lines.append(
            f"large change: {changed.agreement:.2%} of the elements of '{changed.name}' equal "
            f"the original's (check requires {LOW_AGREEMENT:.0%} by default); {LOCATE}"
        )
    return lines


def _kept(output: OutputComparison) -> str:
    """ "'name' keeps 6.5 dB SNR (cosine 0.8921)"."""
    return f"'{output.name}' keeps {output.snr_db:.1f} dB SNR (cosine {output.cosine:.4f})"


def _fixes(passes: Sequence[str] | None) -> str:
    """The "; for prune, ...; for quant, ..." of the lossy passes among ``passes``, once each."""
    names = ["quant"] if passes is None else list(dict.fromkeys(p for p in passes if p in FIXES))
    return "".join(f"; for {name}, {FIXES[name]}" for name in names)


def _unjudged_integers(numeric: NumericReport) -> list[str]:
    """A note where tolerances were given and none judges the integer outputs: cosine does
    not (it means nothing on class ids), and a PASS should not hide changed tags."""
    tolerances = numeric.tolerances
    if not tolerances.any or tolerances.min_agreement is not None or tolerances.elementwise:
        return []
    names = [f"'{o.name}'" for o in numeric.outputs if o.integral]
    if not names:
        return []
    return [
        f"not judged: integer output {', '.join(names)} (cosine judges float outputs; "
        "--min-agreement sets the share of elements that must stay equal)"
    ]


def _uncompared(numeric: NumericReport) -> list[str]:
    """A note per output that is NaN/Inf in both models at some elements: agreement, which the
    NaN/Inf column (the candidate's new ones) shows as 0/0 and the figures leave out. A graph
    network for NMR shifts writes NaN wherever its atom mask is false: 31 such elements of
    its output were in the JSON report only. (An output NaN/Inf everywhere is warned about
    by ``compare``.)"""
    return [
        f"not compared: {o.uncompared:,} elements of '{o.name}' are NaN/Inf in both models; "
        f"its figures cover the {o.elements:,} finite in both"
        for o in numeric.outputs
        if o.uncompared and o.elements
    ]
