"""Samples cut out of a dataset's batches, and joined again into batches of a chosen size.

A source's own batching is the user's accident: a reader may hand over one sample per call or
a thousand. Anything whose result or memory must not depend on it first cuts the stream into
single samples (``single_samples``); a consumer that runs faster on several samples per run
joins consecutive ones again (``grouped_samples``), so how samples are grouped depends only on
their order and shapes, never on how the source was batched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import sessions
from onnx_shrink.runtime_check.data import Batch, Dataset, Feed, InputSpec
from onnx_shrink.warning_records import warn_once

logger = logging.getLogger(__name__)
T = TypeVar("T")


def dynamic_inputs(specs: Sequence[InputSpec]) -> set[str]:
    """Inputs whose first axis holds the samples (``InputSpec.batch_axis``)."""
    return {s.name for s in specs if s.batch_axis}


def joinable(specs: Sequence[InputSpec]) -> bool:
    """Whether samples of a model with these inputs can be joined along the first axis: every
    input has a dynamic first axis (an input without one is shared by the whole batch)."""
    return bool(specs) and dynamic_inputs(specs) == {s.name for s in specs}


def splittable(dataset: Dataset, specs: Sequence[InputSpec]) -> bool:
    """Whether ``dataset``'s feeds can be cut into single samples: its samples are not whole
    feeds, and every input has a sample axis (``joinable``)."""
    return not dataset.whole_samples and joinable(specs)


def single_samples(dataset: Dataset, specs: Sequence[InputSpec]) -> Iterator[Batch]:
    """The dataset one sample per feed: batches are sliced along the dynamic first axis.

    Memory of anything that keeps a run's tensors (per-layer comparison, calibration) is
    then one sample's, whatever batch size the source was read in.
    """
    dynamic = dynamic_inputs(specs)
    for batch in dataset.batches():
        if batch.samples <= 1 or not dynamic:
            yield batch
            continue
        yield from split(batch, dynamic)


def first_samples(dataset: Dataset, specs: Sequence[InputSpec], count: int) -> Dataset:
    """``dataset`` cut to its first ``count`` samples (a batch that a model without a dynamic
    first axis takes whole counts whole)."""

    def make_batches() -> Iterator[Batch]:
        left = count
        for batch in single_samples(dataset, specs):
            if left <= 0:
                return
            yield batch
            left -= batch.samples

    samples = None if dataset.samples is None else min(count, dataset.samples)
    return dataset.restreamed(
        make_batches,
        description=f"the first {count} samples of {dataset.description}",
        samples=samples,
        labels=None if dataset.labels is None else dataset.labels[:samples],
    )


def alone_after_failure(
    batches: Iterable[Batch],
    specs: Sequence[InputSpec],
    run: Callable[[Batch], T],
    who: str,
) -> Iterator[tuple[Batch, T]]:
    """``run`` on each batch, as (batch, result). Where a batch of several samples fails
    (``ShrinkError``) and every input has a dynamic first axis, that batch and every later
    one run one sample at a time, said once: a model may declare a dynamic batch axis and
    take one sample (a torch export's Reshape with batch 1 written in; khmersm). A single
    sample's failure is raised."""
    alone = False
    for batch in batches:
        if not alone:
            try:
                result = run(batch)
            except ShrinkError as e:
                if batch.samples <= 1 or not joinable(specs):
                    raise
                warn_alone(who, batch.samples, e)
                alone = True
            else:
                yield batch, result
                continue
        for one in split(batch, dynamic_inputs(specs)):
            yield one, run(one)


def warn_alone(who: str, samples: int, error: Exception) -> None:
    """Say that ``who`` runs every sample alone, the model having failed on ``samples``; once
    a run: khmersm's fixed batch of 1 was said by the check and again by each statistics
    pass, up to five times, the same fact in other words."""
    warn_once(
        logger,
        f"{who}: the model failed on {samples} samples in one run "
        f"({sessions.run_failure(error.__cause__ or error)}); running every sample alone (the "
        "statistics and the check alike)",
        key="every sample alone",
    )


def one_sample_a_run(dataset: Dataset, specs: Sequence[InputSpec]) -> Dataset:
    """``dataset`` with every batch cut into single samples (``single_samples``), as a
    dataset: its first feed the first sample, a one-shot source's copy still one-shot."""
    return restreamed_once(
        dataset, lambda: single_samples(dataset, specs), dataset.first_sample(specs)
    )


def whole_feeds(dataset: Dataset) -> Dataset:
    """``dataset`` with each feed one whole sample (``whole_samples``): never cut along its
    first axis nor joined, each counted as one sample."""

    def make_batches() -> Iterator[Batch]:
        return (Batch(b.feed, 1, b.labels) for b in dataset.batches())

    return restreamed_once(dataset, make_batches, dataset.first_feed(), whole_samples=True)


def restreamed_once(
    dataset: Dataset, make_batches: Callable[[], Iterator[Batch]], first: Feed, **changes
) -> Dataset:
    """``dataset.restreamed``, its first feed ``first`` known (a reader's is read once). A
    one-shot source's copy stays one-shot (it has a ``peek``), so ``replayable`` still spills
    it for the reads after the first."""
    copy = dataset.restreamed(make_batches, **changes)
    if dataset.peek is not None:
        copy = dataclasses.replace(copy, peek=lambda: Batch(first, 1, None))
    copy.knows_first_feed(first)
    return copy


def split(batch: Batch, dynamic: set[str]) -> Iterator[Batch]:
    """``batch`` one sample at a time (inputs not in ``dynamic`` are passed whole). Once the
    next is asked for, a memory-mapped sample's pages go back (``release_pages``)."""
    for i in range(batch.samples):
        feed = {
            name: array[i : i + 1] if name in dynamic else array
            for name, array in batch.feed.items()
        }
        yield Batch(feed, 1, batch.labels[i : i + 1] if batch.labels is not None else None)
        for name in dynamic & feed.keys():
            data_files.release_pages(feed[name])


def grouped_samples(samples: Iterable[Batch], size: Callable[[], int]) -> Iterator[Batch]:
    """Consecutive single samples joined along their first axis into batches of ``size()``
    samples (read as each batch is started). A batch ends early where an input's shape or
    dtype changes; a sample that is not a single one passes through alone.
    """
    pending: list[Batch] = []
    limit = 1
    for sample in samples:
        if pending and (len(pending) >= limit or not same_layout(pending[0], sample)):
            yield joined(pending)
            pending = []
        if sample.samples != 1:
            yield sample
            continue
        if not pending:
            limit = size()
        pending.append(sample)
    if pending:
        yield joined(pending)


def same_layout(a: Batch, b: Batch) -> bool:
    """Whether single sample ``b`` can be joined after ``a``: the same inputs, shapes and
    dtypes, and labels on both or neither."""
    if b.samples != 1 or a.feed.keys() != b.feed.keys() or (a.labels is None) != (b.labels is None):
        return False
    return all(
        a.feed[k].shape == b.feed[k].shape and a.feed[k].dtype == b.feed[k].dtype for k in a.feed
    )


def joined(samples: list[Batch]) -> Batch:
    """Single samples of one layout (``same_layout``) as one batch, in order."""
    if len(samples) == 1:
        return samples[0]
    feed = {name: np.concatenate([s.feed[name] for s in samples]) for name in samples[0].feed}
    # The copy read the samples' pages again (``split`` had handed them back): again.
    for sample in samples:
        for array in sample.feed.values():
            data_files.release_pages(array)
    labels = None
    if samples[0].labels is not None:
        labels = np.concatenate([np.asarray(s.labels) for s in samples])
    return Batch(feed, len(samples), labels)
