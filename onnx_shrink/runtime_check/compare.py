"""Numerics of a candidate model against its reference, accumulated batch by batch.

Per output: max / mean absolute error, relative error ``||c - r|| / ||r||``, cosine, SNR in
dB (``10 log10(||r||^2 / ||c - r||^2)``), NaN/Inf counts, elements outside ``atol + rtol|r|``,
top-1 agreement for ``[N, C]`` outputs that hold class scores, the share of equal elements of id
outputs (32/64-bit integers and booleans: class ids, tags, masks, where cosine means nothing;
``ID_TYPES``), and, with labels,
task accuracy of both models. Accumulators keep sums, never outputs, so memory stays at one
batch however many samples run, and the result does not depend on how samples were batched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np

from onnx_shrink.errors import CandidateFailedError, DataError
from onnx_shrink.runtime_check import labels as labels_mod
from onnx_shrink.runtime_check.data_types import is_numeric
from onnx_shrink.runtime_check.numeric_report import (
    ID_TYPES,
    NumericReport,
    OutputComparison,
    Tolerances,
)
from onnx_shrink.warning_records import warn_once

logger = logging.getLogger(__name__)


CHUNK_ELEMENTS = 1 << 20
"""Values an ``ErrorAccumulator`` folds in at once (8 MiB of float64 per copy)."""


class ErrorAccumulator:
    """Streaming error statistics of one tensor; ``add`` a batch at a time."""

    def __init__(
        self,
        name: str,
        tolerances: Tolerances = Tolerances(),
        *,
        class_scores: bool = True,
        binary_threshold: float | None = None,
    ) -> None:
        """``class_scores``: whether the tensor may hold class scores (False: no top-1
        agreement, whatever its shape). ``binary_threshold``: the tensor holds one binary
        score a sample, class 1 above it (``labels.binary_score_outputs``); its top-1
        agreement is the share of samples both models put on the same side."""
        self.name = name
        self.tolerances = tolerances
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.diff_sq = 0.0
        self.ref_max = 0.0
        self.nan = 0
        self.inf = 0
        self.outside = 0
        self.top1_same = 0
        self.top1_rows = 0
        self.classifier_like = class_scores or binary_threshold is not None
        self.binary_threshold = binary_threshold
        self.equal = 0
        self.integral = False
        self.uncompared = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise CandidateFailedError(
                f"output '{self.name}': the candidate's shape {candidate.shape} is not the "
                f"reference's {reference.shape} on the same inputs"
            )
        if not is_numeric(reference):
            return
        if reference.size == 0:
            return
        ref_all, cand_all = reference.ravel(), candidate.ravel()
        self.integral = reference.dtype in ID_TYPES
        # In chunks: float64 copies of a whole 128-line PP-OCRv4 rec output (34M values)
        # took seconds to allocate alone.
        for start in range(0, ref_all.size, CHUNK_ELEMENTS):
            stop = start + CHUNK_ELEMENTS
            if self.integral:  # compared as stored: int64 ids past 2**53 are not float64s
                self.equal += int(np.count_nonzero(ref_all[start:stop] == cand_all[start:stop]))
            self._add_flat(ref_all[start:stop], cand_all[start:stop])
        self._add_top1(reference, candidate)

    def _add_flat(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Fold in flat, equally long parts of a reference and a candidate output."""
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        cand_bad = None
        if np.isfinite(ref).all() and np.isfinite(cand).all():  # the common case: no masks
            ref_f, cand_f = ref, cand
        else:
            # NaN/Inf that the reference also has are agreement, not error.
            ref_ok, cand_ok = np.isfinite(ref), np.isfinite(cand)
            cand_bad = ~cand_ok & ref_ok
            self.nan += int(np.sum(np.isnan(cand) & ~np.isnan(ref)))
            self.inf += int(np.sum(np.isinf(cand) & ~np.isinf(ref)))
            self.uncompared += int(np.sum(~ref_ok & ~cand_ok))
            both = ref_ok & cand_ok
            ref_f, cand_f = ref[both], cand[both]
        diff = np.abs(ref_f - cand_f)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.ref_max = max(self.ref_max, float(np.abs(ref_f).max()))
        self.sum_abs += float(diff.sum())
        self.count += diff.size  # the mean is over the elements compared
        self.dot += float(ref_f @ cand_f)
        self.ref_sq += float(ref_f @ ref_f)
        self.cand_sq += float(cand_f @ cand_f)
        self.diff_sq += float(diff @ diff)
        if self.tolerances.elementwise:
            bound = (self.tolerances.atol or 0.0) + (self.tolerances.rtol or 0.0) * np.abs(ref_f)
            bad = 0 if cand_bad is None else int(np.sum(cand_bad))
            self.outside += int(np.sum(diff > bound)) + bad

    def _add_top1(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if self.binary_threshold is not None and self.classifier_like:
            self._add_decisions(reference, candidate)
            return
        if (
            not self.classifier_like
            or reference.ndim != 2
            or reference.shape[1] < 2
            or not np.issubdtype(reference.dtype, np.floating)
        ):
            self.classifier_like = False
            return
        # A row holding NaN or Inf has no meaningful argmax (numpy's is the first NaN).
        rows = np.isfinite(reference).all(-1) & np.isfinite(candidate).all(-1)
        same = reference[rows].argmax(-1) == candidate[rows].argmax(-1)
        self.top1_same += int(np.sum(same))
        self.top1_rows += int(rows.sum())

    def _add_decisions(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Top-1 agreement of one binary score a sample: both above the threshold, or not."""
        if reference.ndim not in (1, 2) or reference.size != len(reference):
            self.classifier_like = False  # not one score a sample after all
            return
        if not np.issubdtype(reference.dtype, np.floating):
            self.classifier_like = False
            return
        ref, cand = reference.reshape(-1), candidate.reshape(-1)
        rows = np.isfinite(ref) & np.isfinite(cand)
        threshold = self.binary_threshold
        same = labels_mod.binary_classes(ref[rows], threshold) == labels_mod.binary_classes(
            cand[rows], threshold
        )
        self.top1_same += int(np.sum(same))
        self.top1_rows += int(rows.sum())

    def result(self) -> OutputComparison:
        """The figures over the elements finite in both; where the candidate has NaN or Inf
        the reference has not, they are not comparable, and say so: errors ∞, SNR −∞,
        cosine NaN (the finite rest of an all-NaN output would read as a perfect match)."""
        if self.nan or self.inf:
            return self._comparison(math.inf, math.inf, math.inf, math.nan, -math.inf)
        norms = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if norms > 0:
            cosine = self.dot / norms
        else:  # both all-zero tensors agree exactly; one zero and one not do not
            cosine = 1.0 if self.ref_sq == self.cand_sq else 0.0
        if self.diff_sq == 0:
            snr = math.inf
        elif self.ref_sq == 0:
            snr = -math.inf
        else:
            snr = 10 * math.log10(self.ref_sq / self.diff_sq)
        relative = (
            math.sqrt(self.diff_sq / self.ref_sq)
            if self.ref_sq
            else (0.0 if self.diff_sq == 0 else math.inf)
        )
        mean = self.sum_abs / self.count if self.count else 0.0
        return self._comparison(self.max_abs, mean, relative, cosine, snr)

    def _comparison(
        self, max_abs: float, mean_abs: float, relative: float, cosine: float, snr: float
    ) -> OutputComparison:
        return OutputComparison(
            name=self.name,
            max_abs_error=max_abs,
            mean_abs_error=mean_abs,
            relative_error=relative,
            cosine=cosine,
            snr_db=snr,
            reference_max_abs=self.ref_max,
            elements=self.count,
            nan_count=self.nan,
            inf_count=self.inf,
            outside_tolerance=self.outside,
            top1_agreement=(self.top1_same / self.top1_rows)
            if self.classifier_like and self.top1_rows
            else None,
            agreement=(self.equal / self.count if self.count else 1.0) if self.integral else None,
            uncompared=self.uncompared,
        )


def _scored(accuracy, ref_out, cand_out, labels, first, tolerances, data, binary):
    """``accuracy`` with this batch's labels scored, or None where they cannot be (and
    accuracy is not asked for: then they are a ``DataError``)."""
    samples = len(labels)
    target = labels_mod.scored_output(ref_out, samples, binary)
    if target is None:  # no output to score them on: the report says why
        return accuracy
    try:  # labels that are no class indices, or name classes it has not, would read as 0%
        indices = labels_mod.scored_classes(labels, data or "the labels", target, first)
    except DataError as e:
        if tolerances.accuracy_asked:
            raise
        warn_once(logger, f"{e}; accuracy is not measured")
        return None
    reference = target.predicted(ref_out[target.name], samples)
    accuracy.add(reference, target.predicted(cand_out[target.name], samples), indices)
    return accuracy


_SCORES = (
    "holds per-sample class scores [samples, classes] or one binary score a sample (a "
    "Sigmoid's or a linear layer's [samples, 1])"
)
"""What an output must hold for labels to score it, in words"""

OutputBatch = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], np.ndarray | None]


def compare_batches(
    batches: Iterable[OutputBatch],
    *,
    tolerances: Tolerances = Tolerances(),
    samples: int | None = None,
    data: str = "",
    synthetic: bool = False,
    class_outputs: Collection[str] | None = None,
    binary_outputs: Mapping[str, float] | None = None,
) -> NumericReport:
    """Fold (reference outputs, candidate outputs, labels) batches into a ``NumericReport``.
    ``class_outputs``: the outputs whose top-1 agreement is measured, where their batches are
    ``[N, C]`` (``labels.class_score_outputs``); None: every output so shaped.
    ``binary_outputs``: the outputs that hold one binary score a sample, and the threshold
    above which it names class 1 (``labels.binary_score_outputs``): their top-1 agreement is
    measured, and labels are scored on them where no output holds ``[N, C]`` scores.

    Raises:
        CandidateFailedError: the candidate lacks an output, or gives one of another shape.
        DataError: under an accuracy tolerance, labels that cannot score accuracy (not class
            indices or probability rows, or naming a class the scored output has not);
            without one, accuracy is left unmeasured, with a warning.
    """
    accumulators: dict[str, ErrorAccumulator] = {}
    accuracy: labels_mod.AccuracyAccumulator | None = labels_mod.AccuracyAccumulator()
    seen = 0
    for ref_out, cand_out, labels in batches:
        missing = set(ref_out) - set(cand_out)
        if missing:
            raise CandidateFailedError(f"the candidate has no output {sorted(missing)[0]!r}")
        for name, ref in ref_out.items():
            if name not in accumulators:
                scores = class_outputs is None or name in class_outputs
                accumulators[name] = ErrorAccumulator(
                    name,
                    tolerances,
                    class_scores=scores,
                    binary_threshold=(binary_outputs or {}).get(name),
                )
            accumulators[name].add(ref, cand_out[name])
        if labels is not None and accuracy is not None:
            accuracy = _scored(
                accuracy, ref_out, cand_out, labels, seen, tolerances, data, binary_outputs
            )
        seen += len(labels) if labels is not None else 0
    unusable = accuracy is None  # labels that cannot score accuracy (warned above)
    outputs = tuple(a.result() for a in accumulators.values())
    for out in outputs:  # its error 0 and cosine 1 would read as a perfect match
        if out.uncompared and not out.elements:
            warn_once(
                logger,
                f"output '{out.name}': every element is NaN/Inf in both models "
                f"({out.uncompared}), so its figures compare nothing: inputs the model "
                "accepts (--data) give finite ones",
            )
    ref_acc, cand_acc = (accuracy or labels_mod.AccuracyAccumulator()).result()
    failures = judge(outputs, ref_acc, cand_acc, tolerances)
    if ref_acc is None and tolerances.max_accuracy_drop is not None:
        why = (
            "the labels cannot score it (as warned)"
            if unusable
            else f"labels were given, but no output {_SCORES} to score them on"
            if seen
            else "the data has no labels (--labels, or a 'labels' array in the .npz)"
        )
        if tolerances.accuracy_required:
            failures.append(f"max_accuracy_drop: no accuracy was measured: {why}")
        else:  # the verdict says so: "PASS (accuracy not measured)"
            logger.info("accuracy not measured: %s", why)
    elif ref_acc is None and seen and not unusable:
        # Without a tolerance on it, labels that scored nothing went unsaid: smart-turn's one
        # sigmoid column [N, 1] is no class scores, and its labels were dropped silently.
        warn_once(
            logger,
            f"accuracy not measured: labels were given, but no output {_SCORES} to score them on",
        )
    return NumericReport(
        outputs=outputs,
        samples=samples if samples is not None else seen,
        data=data,
        synthetic=synthetic,
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
        tolerances=tolerances,
        failures=tuple(failures),
    )


def judge(
    outputs: Iterable[OutputComparison],
    reference_accuracy: float | None,
    candidate_accuracy: float | None,
    tolerances: Tolerances,
) -> list[str]:
    """One sentence per broken tolerance; empty when everything holds."""
    failures = []
    for out in outputs:
        if out.nan_count or out.inf_count:
            failures.append(
                f"output '{out.name}': {out.nan_count} NaN and {out.inf_count} Inf values where "
                "the reference is finite"
            )
        if tolerances.elementwise and out.outside_tolerance:
            failures.append(
                f"output '{out.name}': {out.outside_tolerance} of "
                f"{out.elements + out.nan_count + out.inf_count} elements exceed "
                f"atol={tolerances.atol or 0:g} + rtol={tolerances.rtol or 0:g}*|ref| "
                f"(max abs error {out.max_abs_error:.3g})"
            )
        if out.integral:
            if tolerances.min_agreement is not None and out.agreement < tolerances.min_agreement:
                failures.append(
                    f"output '{out.name}': {out.agreement:.2%} of its elements equal the "
                    f"reference's < min agreement {tolerances.min_agreement:.10g}"
                )
        elif tolerances.min_cosine is not None and out.cosine < tolerances.min_cosine:
            failures.append(
                f"output '{out.name}': cosine {out.cosine:.6f} < min {tolerances.min_cosine:.10g}"
            )
    if (
        tolerances.max_accuracy_drop is not None
        and reference_accuracy is not None
        and candidate_accuracy is not None
        and reference_accuracy - candidate_accuracy > tolerances.max_accuracy_drop
    ):
        failures.append(
            f"accuracy dropped {reference_accuracy - candidate_accuracy:.2%} "
            f"({reference_accuracy:.2%} -> {candidate_accuracy:.2%}), more than the allowed "
            f"{tolerances.max_accuracy_drop:.2%}"
        )
    return failures
