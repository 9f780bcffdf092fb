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
from typing import TYPE_CHECKING

from onnx_shrink.runtime_check.numeric_report import LOW_AGREEMENT, NumericReport, OutputComparison
from onnx_shrink.wording import counted

if TYPE_CHECKING:  # accuracy_target checks with checker, which takes its notes from here
    from onnx_shrink.runtime_check.accuracy_target import TargetOutcome

LOCATE = "--layers shows where the error first jumps"
SHOWN = 3  # large-error outputs named in the note

EQUALIZE_FIX = "equalize before quant evens out a channel far wider than the rest of its tensor"
QUANT_SEARCH_FIX = (
    "--sensitivity ranks the layers that cost it, and --set quant.max_error=0.1 keeps the "
    "worst of them float until every output's relative error is within 0.1"
)
QUANT_FIX = f"{QUANT_SEARCH_FIX}; {EQUALIZE_FIX}"
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


def notes(
    numeric: NumericReport,
    passes: Sequence[str] | None = None,
    *,
    pipeline: Sequence[str] = (),
    targets: Sequence[TargetOutcome] = (),
) -> list[str]:
    """The notes on ``numeric``, the unchecked branches first; [] where there is none.

    ``passes``: the names of the passes that made the candidate, in order (a shrink's check);
    None where they are unknown (``onnx-shrink check``), where quant's fix is named as the
    likeliest. ``pipeline``: every pass the shrink ran, changed the model or not (a fix it
    already ran is not proposed). ``targets``: what its ``quant.max_error`` searches found
    on the calibration data (the fix then builds on the target given, and a target met there
    but missed on the check's data is said)."""
    fixes = _Fixes(passes, tuple(pipeline), tuple(t for t in targets if not t.rolled_back))
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
        lines.append(f"large error: {named}{more}; {LOCATE}{fixes}")
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
            f"{LOCATE}{fixes}"
        )
    for out in numeric.large_part_errors:
        # YOLOv8's output: 4 box rows in pixels beside a score row per class, 0.033 over the
        # output and 0.43 over the scores.
        lines.append(
            f"large error in part of '{out.name}' ({out.small_part}, {out.small_part_share:.2%} "
            f"of its norm): it keeps {out.small_part_snr_db:.1f} dB SNR (relative error "
            f"{out.small_part_error:.3g}), where the whole output keeps {out.snr_db:.1f} dB, "
            f"its large part hiding it; {LOCATE}{fixes}"
        )
    lines += _targets_missed(numeric, fixes)
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


class _Fixes:
    """The "; for prune, ...; for quant, ..." of the lossy passes among ``passes``, once each
    (``str``), quant's built on the target it was given and without equalize where the
    ``pipeline`` ran it: sweep 13's PP-OCRv5 rec, quantized to quant.max_error=0.05, was
    told to set quant.max_error=0.1, and to equalize after fold,equalize,quant."""

    def __init__(
        self,
        passes: Sequence[str] | None,
        pipeline: tuple[str, ...],
        targets: tuple[TargetOutcome, ...],
    ) -> None:
        self.pipeline, self.targets = pipeline, targets
        named = ["quant"] if passes is None else [p for p in passes if p in FIXES]
        self.lossy = list(dict.fromkeys(named))

    def __str__(self) -> str:
        return "".join(f"; for {name}, {self._fix(name)}" for name in self.lossy)

    def _fix(self, name: str) -> str:
        if name != "quant":
            return FIXES[name]
        target = self.targets[0] if self.targets else None
        if target is None:
            fix = QUANT_SEARCH_FIX
        elif target.met:
            fix = (
                "--sensitivity ranks the layers that cost it, and a quant.max_error below "
                f"{target.max_error:g} keeps more of them float"
            )
        else:
            fix = (
                f"quant.max_error={target.max_error:g} was missed on the calibration data too "
                f"({target.error:.3g} at best), and quant.exclude_op_types keeps whole op types "
                "float"
            )
        return fix if "equalize" in self.pipeline else f"{fix}; {EQUALIZE_FIX}"


def _targets_missed(numeric: NumericReport, fixes: _Fixes) -> list[str]:
    """A note per ``quant.max_error`` met on the calibration samples and missed on the check's
    data, by the output the target judges by (``scored_error``). Sweep 13's PP-OCRv5 rec:
    0.0285 over 16 calibration samples with 12 layers float, 0.113 over the 8 checked, one of
    which had 0.316 alone: the layers were chosen to fit the samples measured."""
    ordered_by = dict(numeric.ordered_by)
    judged = [
        o
        for o in numeric.outputs
        if o.name not in ordered_by and not o.integral and o.elements and o.scored_error >= 0
    ]
    worst = max(judged, key=lambda o: o.scored_error, default=None)
    others = [name for name in fixes.lossy if name != "quant"]
    also = f", {' and '.join(others)} adding theirs" if others else ""
    lines = []
    for target in fixes.targets:
        if worst is None or not target.met or target.every_layer:
            continue
        if worst.scored_error <= target.max_error:
            continue
        where = f"'{worst.name}'"
        if worst.scored_error > worst.relative_error:  # its small part
            where = f"part of '{worst.name}' ({worst.small_part})"
        lines.append(
            f"quant.max_error={target.max_error:g} holds on the "
            f"{counted(target.samples, 'calibration sample')} it was measured on "
            f"({target.error:.3g}), not on the {counted(numeric.samples, 'sample')} checked: "
            f"{where} has relative error {worst.scored_error:.3g}{also}; the layers kept "
            "float were chosen to fit the calibration samples, and more of them, like the "
            "checked ones, or a lower quant.max_error carry the target over"
        )
    return lines


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
