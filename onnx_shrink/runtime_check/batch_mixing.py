"""Whether a model mixes the samples of a batch, and data that then runs each sample alone.

The check and calibration join samples along the first axis where every input has a dynamic
one: fewer, larger runs. That is only sound where each sample's outputs do not depend on its
batch-mates. Some models do mix them: openWakeWord's mel spectrogram normalizes by a
``ReduceMax`` over all axes, batch included, so a clip's features change with the loudest clip
it runs with. Its check read cosine 0.92 on 48 clips joined; one clip at a time, as the package
runs it, the same candidate gave -0.013. Calibration statistics shift the same way.

``vetted`` finds out by running two samples alone and joined (three small runs), before
anything joins them: the quietest and the loudest of the first feed (of the first
``TRIAL_SAMPLES`` where that holds one sample), where mixing shows. Where a sample's outputs
change, the data is given back one sample per feed, each a whole sample
(``sample_batches.whole_feeds``), so nothing joins them again; where they do not, the data says
so (``Dataset.independent_samples``), and calibration does not try the same model again. The
check tries its candidate too: quantized, openWakeWord's mel model mixed samples on noise where
the float model did not.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_shrink import warning_records
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.quant import dynamic
from onnx_shrink.runtime_check import sample_batches, sessions
from onnx_shrink.runtime_check.data_types import Batch, Dataset, Feed, InputSpec
from onnx_shrink.wording import counted

logger = logging.getLogger(__name__)

RELATIVE_TOLERANCE = 1e-3
"""How far a sample's float output may move, joined, relative to the output's largest
magnitude alone, before the model is taken to mix samples: a different batch size may pick
another kernel and sum in another order (differences near 1e-6), where a mixing model moves
its outputs by their own size."""

TRIAL_SAMPLES = 16
"""Samples the pair is chosen from where the first feed holds one"""


def vetted(
    dataset: Dataset,
    specs: Sequence[InputSpec],
    session: ort.InferenceSession,
    label: str = "the model",
    model: ir.Model | None = None,
) -> Dataset:
    """``dataset`` as the model ``session`` runs (named ``label``) may read it: marked
    ``independent_samples`` where two samples (``_trial_pair``) give the same outputs
    joined as alone; one sample per run, with a warning naming the output that moved, where they do
    not. Returned as it is, with no run, where its samples cannot be joined (whole samples,
    fewer than two, two shapes), and as it is where a trial run fails (a model that takes
    one sample whatever it declares: the readers' ``alone_after_failure`` then splits).

    The mark is the caller's to trust: it says one model was tried, and a compressed copy
    may mix where its input does not (int8 zeros under a Log that a batch-wide max clips).
    ``model``: the model ``session`` runs, where known: the warning then names its
    ``dynamic.PER_RUN_SCALES`` nodes as the likely cause."""
    if not sample_batches.splittable(dataset, specs):
        return dataset
    pair = _trial_pair(dataset, specs)
    if len(pair) < 2 or not sample_batches.same_layout(*pair):
        return dataset

    def run(feed: Feed, what: str) -> dict[str, np.ndarray]:
        fitted = sessions.fitted_feed(session, feed)
        return sessions.run(session, fitted, failed=f"the model failed on {what}")

    try:
        alone = [run(sample.feed, "a sample alone") for sample in pair]
        joined = run(sample_batches.joined(pair).feed, "two samples joined")
        moved = mixed_output(alone, joined)
        if moved is not None and not _moved_with_batch_mates(pair, alone, joined, run):
            logger.info(
                "%s: %s: output '%s' of a sample moves between runs of one and of two samples, "
                "but not with its batch-mate: another batch size's arithmetic, not mixing",
                dataset.description,
                label,
                moved,
            )
            moved = None
    except ShrinkError:  # the readers' own runs fail, or split, and say why
        return dataset
    if moved is None:
        return dataclasses.replace(dataset, independent_samples=True)
    # Once a run for each model and data: quant.max_error's search checks a candidate per
    # measurement, and said it 5 times on a CRNN whose LSTMs quantize per run (sweep 12).
    warning_records.warn_once(
        logger,
        f"{dataset.description}: {label} mixes the samples of a batch: output '{moved}' of a "
        f"sample changes when it runs beside another ({_likely_cause(model)}), so every "
        "sample runs alone; to run batches as you run them, give each batch as one entry of "
        "an array with one more axis",
        key=f"batch mixing: {dataset.description}: {label}",
    )
    return each_sample_alone(dataset, specs)


def _likely_cause(model: ir.Model | None) -> str:
    """Why a model's samples mix: its per-run int8 scales where it has any (quant-dynamic
    on occular-deskew's CNN was said to reduce over the batch axis), else the usual cause."""
    counts = dynamic.per_run_nodes(model) if model is not None else collections.Counter()
    if not counts:
        return "a reduction or normalization over the batch axis"
    nodes = ", ".join(counted(n, f"{op} node") for op, n in sorted(counts.items()))
    return f"one int8 scale per run, shared by every sample in it: its {nodes}"


def _moved_with_batch_mates(
    pair: Sequence[Batch],
    alone: Sequence[Mapping[str, np.ndarray]],
    joined: Mapping[str, np.ndarray],
    run: Callable[[Feed, str], dict[str, np.ndarray]],
) -> bool:
    """Whether a sample's outputs in ``joined`` differ from its own beside a copy of itself:
    the same batch size, so the same kernels and order of sums, and only the batch-mate
    changed. A sample alone against joined also sees another batch size's arithmetic, which
    a quantized model can amplify: a float sum rounded otherwise tips an int8 rounding, and
    PP-OCRv4 rec's softmax moved by 0.06 in 16 of 530,000 values, read as mixing, while
    beside copies of themselves both samples gave the joined run's values exactly."""
    beside_themselves = []
    for index, (sample, own) in enumerate(zip(pair, alone, strict=True)):
        doubled = run(sample_batches.joined([sample] * len(pair)).feed, "a sample twice")
        # The rows the sample holds where ``joined`` holds it (as many as alone: its copies'
        # are alike), which ``mixed_output`` compares; outputs it skips are left whole.
        beside_themselves.append(
            {name: _rows_at(rows, index, own.get(name)) for name, rows in doubled.items()}
        )
    return mixed_output(beside_themselves, joined) is not None


def _rows_at(rows: np.ndarray, index: int, own: np.ndarray | None) -> np.ndarray:
    """The ``index``-th of equal parts of ``rows`` along its first axis, each as long as
    ``own``'s; ``rows`` as it is where either has no first axis."""
    if not all(isinstance(a, np.ndarray) and a.ndim for a in (rows, own)):
        return rows
    count = own.shape[0]
    return rows[index * count : (index + 1) * count]


def each_sample_alone(dataset: Dataset, specs: Sequence[InputSpec]) -> Dataset:
    """``dataset`` one sample a feed, marked so that no reader joins them again."""
    return sample_batches.whole_feeds(sample_batches.one_sample_a_run(dataset, specs))


def _trial_pair(dataset: Dataset, specs: Sequence[InputSpec]) -> list[Batch]:
    """The two samples, of the first feed's (or else of the first ``TRIAL_SAMPLES``), whose
    float inputs are smallest and largest in magnitude: mixing shows between samples far
    apart (the mel model clips each bin at 80 dB below its batch's loudest: two clips 5 dB
    apart run the same joined as alone, 55 dB apart they do not). The first two where
    nothing tells them apart. A one-shot source (a reader not yet made replayable) is never
    read past the feed it has peeked.

    Each sample is weighed as it is split off, so that a memory-mapped sample's pages go
    back before the next is read (``sample_batches.split``): weighing a 128-sample .npz all
    at once kept its whole 150 MB resident, calibration's peak."""
    first = dataset.first_feed()
    dynamic = sample_batches.dynamic_inputs(specs)
    held = Batch(first, dataset.samples_in(first, specs), None)
    if held.samples >= 2 or dataset.peek is not None:
        samples = sample_batches.split(held, dynamic)
    else:
        samples = itertools.islice(sample_batches.single_samples(dataset, specs), TRIAL_SAMPLES)
    first_two: list[Batch] = []
    low = high = None  # (magnitude, sample): the first smallest, the first largest
    for sample in samples:
        magnitude = _magnitude(sample.feed)
        if len(first_two) < 2:
            first_two.append(sample)
        if low is None or magnitude < low[0]:
            low = (magnitude, sample)
        if high is None or magnitude > high[0]:
            high = (magnitude, sample)
    if len(first_two) < 2 or low[1] is high[1]:  # fewer than two, or all alike
        return first_two
    return [low[1], high[1]]


def _magnitude(feed: Feed) -> float:
    """The largest finite magnitude of a sample's float inputs (0 without any)."""
    floats = (a for a in feed.values() if np.issubdtype(a.dtype, np.floating))
    return max(map(_largest_finite, floats), default=0.0)


def _largest_finite(array: np.ndarray) -> float:
    """The largest finite magnitude in ``array`` (0 without any)."""
    if array.size == 0:
        return 0.0
    # Two reads and no copy where every value is finite (5x faster than the mask below:
    # the trial weighs every sample of a first feed, 128 of PP-OCRv4 det's in 0.15 s).
    largest = max(float(array.max()), -float(array.min()))
    if math.isfinite(largest):
        return largest
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max()) if finite.size else 0.0


def mixed_output(
    alone: Sequence[Mapping[str, np.ndarray]], joined: Mapping[str, np.ndarray]
) -> str | None:
    """The first float output whose rows in ``joined`` (the samples of ``alone`` run as one
    batch, in order) differ from the samples' own (``RELATIVE_TOLERANCE``); None where none
    does. Outputs whose first axis does not hold the samples' rows in order (a scalar, a
    list of detections whose length varies) say nothing and are skipped."""
    for name, rows in joined.items():
        parts = [outputs[name] for outputs in alone]
        if not all(_comparable(part, rows) for part in parts):
            continue
        ends = np.cumsum([part.shape[0] for part in parts])
        if ends[-1] != rows.shape[0]:
            continue
        if any(map(_differ, parts, np.split(rows, ends[:-1]))):
            return name
    return None


def _comparable(part: np.ndarray, rows: np.ndarray) -> bool:
    return (
        isinstance(part, np.ndarray)
        and np.issubdtype(part.dtype, np.floating)
        and part.ndim >= 1
        and part.ndim == rows.ndim
        and part.shape[1:] == rows.shape[1:]
    )


def _differ(alone: np.ndarray, joined: np.ndarray) -> bool:
    alone, joined = alone.astype(np.float64), joined.astype(np.float64)
    tolerance = RELATIVE_TOLERANCE * _largest_finite(alone)
    close = np.isclose(joined, alone, rtol=RELATIVE_TOLERANCE, atol=tolerance, equal_nan=True)
    return not bool(close.all())
