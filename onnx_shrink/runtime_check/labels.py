"""Labels for task accuracy: what can label a sample, the class each one names, and the
top-1 accuracy both models score on them (``AccuracyAccumulator``, ``scored_output``),
and which of a model's outputs hold class scores at all (``class_score_outputs``) or one
binary score a sample (``binary_score_outputs``).

A label is one class index per sample (``[N]`` or ``[N, 1]``: integers, or floats that hold
integers) or a one-hot / probability row per sample (``[N, C]``: values in [0, 1] summing to
1), read as its argmax. Anything else (strings, 2.5, class 110 of 10, rows of repeated
indices) still gives an argmax to compare with, so it would be scored: 0% for both models,
no drop, and an accuracy tolerance passes on nothing. Where accuracy is asked for (an
accuracy tolerance), such labels are refused (``scored_classes``): what they are wrong in,
and the classes they name once the scored output's width is known; elsewhere
accuracy is left unmeasured, with a warning. Reading data checks only that there is a label
per sample (``per_sample``): a calibration run does not read them, and data may carry labels
for another task (segmentation masks, token ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnx_shrink.errors import DataError
from onnx_shrink.runtime_check.data_types import VALUE_CARRIERS, show_shape

ROW_SUM_TOLERANCE = 1e-3
"""how far from 1 a probability row may sum (float16 softmax rows are off by ~1e-4)"""

_NOT_NUMBERS = {"U": "strings", "S": "bytes", "O": "Python objects", "c": "complex numbers"}
_GIVE = "give class indices (integers from 0) or one-hot / probability rows"


def per_sample(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels``, when they hold a label per sample (an array of one dimension or more).

    Raises:
        DataError: one value, not one per sample.
    """
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise DataError(f"{where}: labels are one value, not one per sample: {_GIVE}")
    return labels


def checked(labels: np.ndarray, where: str, first: int = 0) -> np.ndarray:
    """``labels`` (of the samples from ``first`` on), once they can label samples as the
    module docstring says.

    Raises:
        DataError: one line naming what is wrong (dtype, shape, not integers, a negative
            index, a row that is no probability row) and the first sample it is wrong at.
    """
    labels = np.asarray(labels)
    kind = labels.dtype.kind
    if kind not in "biuf":
        what = _NOT_NUMBERS.get(kind, f"of dtype {labels.dtype}")
        raise DataError(f"{where}: labels are {what} ({labels.dtype}): {_GIVE}")
    if labels.ndim not in (1, 2):
        raise DataError(
            # Per sample, not the batch's: the check may score the labels in batches of
            # any size (one sample a run after quant-dynamic), and says this once.
            f"{where}: labels have shape {show_shape(labels.shape[1:])} per sample: give one "
            "class index per sample [N], or one one-hot / probability row per sample [N, C]"
        )
    if not labels.size:
        return labels
    if labels.ndim == 2 and labels.shape[1] > 1:
        _check_rows(labels, where, first)
        return labels
    indices = labels.reshape(-1)
    if kind == "f":
        wrong = np.flatnonzero(~np.isfinite(indices) | (indices != np.round(indices)))
        if wrong.size:
            at = wrong[0]
            value = float(indices[at])
            raise DataError(
                f"{where}: labels are not integers (sample {first + at}: {value:g}): {_GIVE}"
            )
    negative = np.flatnonzero(indices < 0)
    if negative.size:
        at = negative[0]
        raise DataError(
            f"{where}: label {float(indices[at]):g} (sample {first + at}) is negative: class "
            "indices count from 0"
        )
    return labels


def _check_rows(rows: np.ndarray, where: str, first: int) -> None:
    """Every row is a probability row: finite values in [0, 1] that sum to 1."""
    values = rows.astype(np.float64)
    sums = values.sum(axis=1)
    bad = ~np.all((values >= 0) & (values <= 1), axis=1)  # NaN is outside too
    bad |= ~(np.abs(sums - 1) <= ROW_SUM_TOLERANCE)
    wrong = np.flatnonzero(bad)
    if wrong.size:
        at = wrong[0]
        shown = " ".join(f"{v:g}" for v in values[at][:6]) + (" ..." if rows.shape[1] > 6 else "")
        raise DataError(
            f"{where}: labels of shape {show_shape(rows.shape)} are not one-hot or probability "
            f"rows (sample {first + at}: [{shown}]): give one class index per sample, or rows of "
            "values in [0, 1] that sum to 1"
        )


def class_indices(labels: np.ndarray) -> np.ndarray:
    """One class index per sample: labels as given ``[samples]`` (or ``[samples, 1]``), or
    one-hot / probability rows ``[samples, classes]`` reduced to their argmax."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.argmax(axis=1)
    return labels.reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else labels.reshape(-1)


@dataclasses.dataclass(frozen=True)
class ScoredOutput:
    """The output labels are scored on: ``classes`` scores a sample, or one binary score a
    sample that names class 1 above ``threshold`` (0.5 a probability, 0 a logit)."""

    name: str
    classes: int
    threshold: float | None = None

    @property
    def holds(self) -> str:
        """What it holds a sample, in words."""
        if self.threshold is None:
            return f"{self.classes} scores a sample"
        return f"one binary score a sample: class 1 above {self.threshold:g}"

    def predicted(self, output: np.ndarray, samples: int) -> np.ndarray:
        """The class ``output``'s batch of ``samples`` names for each: its argmax, or for a
        binary score ``binary_classes``."""
        if self.threshold is None:
            return output.reshape(samples, -1).argmax(-1)
        return binary_classes(output.reshape(samples), self.threshold)


def binary_classes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The class each binary score names: 1 above ``threshold``, else 0 (at it too)."""
    return (scores > threshold).astype(np.int64)


def scored_classes(
    labels: np.ndarray, where: str, output: ScoredOutput, first: int = 0
) -> np.ndarray:
    """The class each of ``labels`` (of the samples from ``first`` on) names, once they can
    score ``output`` (``checked``, then ``_check_classes``)."""
    return _check_classes(checked(labels, where, first), output, first)


def _check_classes(labels: np.ndarray, output: ScoredOutput, first: int = 0) -> np.ndarray:
    """The class each of ``labels`` (``checked`` ones, of the samples from ``first`` on)
    names, refusing one the scored ``output`` does not have: index ``output.classes`` or more,
    or rows of another width.

    Raises:
        DataError: naming the first such label, its sample, and the output.
    """
    labels = np.asarray(labels)
    classes = output.classes
    if labels.ndim == 2 and labels.shape[1] > 1 and labels.shape[1] != classes:
        raise DataError(
            f"labels are rows of {labels.shape[1]} classes, but the scored output "
            f"'{output.name}' has {output.holds}: give rows of {classes}, or class indices"
        )
    indices = class_indices(labels)
    outside = np.flatnonzero((indices < 0) | (indices >= classes))
    if outside.size:
        at = outside[0]
        raise DataError(
            f"label {float(indices[at]):g} (sample {first + at}) is outside [0, {classes}), the "
            f"classes of the scored output '{output.name}' ({output.holds}): give class "
            f"indices from 0 to {classes - 1}"
        )
    return indices


class AccuracyAccumulator:
    """Top-1 accuracy of a classifier output against labels, for reference and candidate."""

    def __init__(self) -> None:
        self.correct_ref = 0
        self.correct_cand = 0
        self.total = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> None:
        """Score a batch: the class each model predicts for each sample
        (``ScoredOutput.predicted``), and the class each label names."""
        labels = np.asarray(labels).reshape(-1)
        self.correct_ref += int(np.sum(reference == labels))
        self.correct_cand += int(np.sum(candidate == labels))
        self.total += len(labels)

    def result(self) -> tuple[float | None, float | None]:
        if not self.total:
            return None, None
        return self.correct_ref / self.total, self.correct_cand / self.total


def scored_output(
    outputs: Mapping[str, np.ndarray],
    samples: int,
    binary: Mapping[str, float] | None = None,
) -> ScoredOutput | None:
    """The output labels are scored on in a batch of ``samples``: the first shaped like
    per-sample class scores ``[samples, C]``, else the first of ``binary``
    (``binary_score_outputs``) that holds one float score a sample; None: neither."""
    for name, array in outputs.items():
        if (
            np.issubdtype(array.dtype, np.floating)
            and array.size
            and (array.shape[0] == samples and array.size // samples > 1)
        ):
            return ScoredOutput(name, array.size // samples)
    for name, threshold in (binary or {}).items():
        array = outputs.get(name)
        if (
            array is not None
            and np.issubdtype(array.dtype, np.floating)
            and array.shape in ((samples,), (samples, 1))
        ):
            return ScoredOutput(name, 2, threshold)
    return None


_FEATURE_OPS = frozenset(
    {"Div", "LpNormalization", "LayerNormalization", "ReduceL2", "ReduceMean", "ReduceSum", "Tanh"}
    | {"LSTM", "GRU", "RNN"}
)
"""Ops that end an embedding (a normalization, a pooling, BERT's pooler) or a recurrent state,
not a classifier: the argmax of a sentence embedding or of an LSTM's hidden state names no
class (g2p-id's LSTM state ``[N, 256]`` in float16 read "top-1 agree 41.67%" beside cosine
1.000000: rounding made several saturated values exactly 1.0, and argmax takes the first)"""


def class_score_outputs(graph: ir.Graph) -> frozenset[str]:
    """The outputs of ``graph`` whose argmax over the last axis can name a class, so that
    top-1 agreement means something: rank 2 (or undeclared) with a fixed number of classes
    (a named axis is frames or tokens: swift_f0's pitch ``[1, frames]``), not produced by a
    normalization, a pooling or a recurrent layer (``_FEATURE_OPS``: embeddings, states). The
    comparison still checks each batch's shape: ``[N, C]`` with ``C >= 2``."""
    scores = set()
    for value in graph.outputs:
        shape = value.shape
        if shape is not None and (len(shape) != 2 or not isinstance(shape[1], int)):
            continue
        producer = _maker(value)
        if producer is None or producer.op_type not in _FEATURE_OPS:
            scores.add(value.name)
    return frozenset(scores)


_LOGIT_OPS = frozenset({"Gemm", "MatMul"})
"""Ops that end a linear layer: a single column they write is a logit, class 1 above 0"""


def binary_score_outputs(graph: ir.Graph) -> dict[str, float]:
    """The outputs of ``graph`` that hold one binary score a sample (``[N]`` or ``[N, 1]``,
    or undeclared), each with the threshold above which its score names class 1: 0.5 for a
    Sigmoid's probability, 0 for a linear layer's logit (``_LOGIT_OPS``, or an Add of bias to
    a MatMul). A single column anything else writes (a regression, a count, a norm) names
    no class: smart-turn's labels for its one sigmoid column went unscored."""
    thresholds = {}
    for value in graph.outputs:
        shape = value.shape
        if shape is not None and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            continue
        producer = _maker(value)
        if producer is None:
            continue
        if producer.op_type == "Sigmoid":
            thresholds[value.name] = 0.5
        elif producer.op_type in _LOGIT_OPS or (
            producer.op_type == "Add" and any(_made_by(x, "MatMul") for x in producer.inputs)
        ):
            thresholds[value.name] = 0.0
    return thresholds


def _maker(value: ir.Value) -> ir.Node | None:
    """The node that computes ``value``'s values: its producer, through ``VALUE_CARRIERS``."""
    producer = value.producer()
    while producer is not None and producer.op_type in VALUE_CARRIERS and producer.inputs:
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
    return producer


def _made_by(value: ir.Value | None, op_type: str) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == op_type
