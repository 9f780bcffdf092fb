"""Inputs for running models: files, folders, reader objects, or seeded synthetic data.

Every source becomes a ``Dataset``: a re-iterable (except reader objects, which are read
once) stream of ``Batch``es, each a feed for one ``session.run`` plus the labels of its
samples. Memory is bounded by one batch whatever the number of samples.

Sample conventions for arrays (``.npz``, folders of ``.npy``, or a dict of arrays in memory),
decided per input:

* rank = input rank + 1: each entry along axis 0 is one complete value of the input (this is
  how scalars, states, fixed-batch inputs and inputs without a batch axis, frames x features,
  are given); such a sample's own first axis is never taken for a batch
  (``Dataset.whole_samples``);
* rank = input rank: samples lie along the input's own first (batch) axis;
* a scalar input given as a scalar: the same value for every sample (a sample rate).

When every input uses the second form, samples are fed in batches of up to ``MAX_BATCH``
(or the model's fixed batch size); otherwise one sample per run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import DataError
from onnx_shrink.runtime_check import labels as labels_mod
from onnx_shrink.runtime_check.data_arrays import (
    as_input,
    from_arrays,
    from_named_arrays,
    from_npy_folder,
    from_npz,
)
from onnx_shrink.runtime_check.data_types import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    MAX_BATCH,
    Batch,
    Dataset,
    Feed,
    FeedReader,
    InputSpec,
    check_array,
    samples_in,
    show_shape,
    specs_from_model,
)
from onnx_shrink.runtime_check.synthetic import (
    concrete_shape,
    open_dims_note,
    parse_input_shapes,
    synthetic,
    synthetic_feed,
)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "MAX_BATCH",
    "Batch",
    "Dataset",
    "Feed",
    "FeedReader",
    "InputSpec",
    "check_array",
    "concrete_shape",
    "describe_feed",
    "from_arrays",
    "from_npy_folder",
    "from_npz",
    "from_reader",
    "from_test_data_sets",
    "parse_input_shapes",
    "prepare",
    "replayable",
    "samples_in",
    "specs_from_model",
    "synthetic",
    "synthetic_feed",
    "unfit_hint",
]

logger = logging.getLogger(__name__)

# ---- onnxruntime's test layout, reader objects ----------------------------------------------


def from_test_data_sets(path: str | Path, specs: Sequence[InputSpec]) -> Dataset:
    """Folders ``test_data_set_*/input_*.pb`` (one sample each, onnxruntime's test layout)."""
    root = Path(path)
    sets = sorted(root.glob("test_data_set_*"), key=lambda p: _natural_key(p.name))
    if not sets:
        raise DataError(f"{root}: no test_data_set_* folders")

    def make_batches() -> Iterator[Batch]:
        for folder in sets:
            tensors = [
                data_files.load_tensor_pb(p)
                for p in sorted(folder.glob("input_*.pb"), key=lambda p: _natural_key(p.name))
            ]
            if len(tensors) != len(specs):
                raise DataError(f"{folder}: {len(tensors)} inputs, the model has {len(specs)}")
            feed = {}
            for index, (name, array) in enumerate(tensors):
                spec = next((s for s in specs if s.name == name), specs[index])
                check_array(spec, array, str(folder))
                feed[spec.name] = array
            yield Batch(feed, samples_in(feed, specs), None)

    # Each folder holds one feed, which may be a batch: counted as the feeds are read.
    return Dataset(str(root), synthetic=False, has_labels=False, make_batches=make_batches)


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _owned(feed: Mapping[str, object], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """A reader's feed as arrays of its own: copied, since readers may refill one buffer
    for every ``get_next()`` (fine for onnxruntime, which uses each feed at once, while
    runs here join several samples); keys the model has no input for left out (a
    tokenizer's token_type_ids for a model without them), as a dict's are."""
    names = {spec.name for spec in specs}
    return {
        name: as_input(value, specs, name, copy=True)
        for name, value in feed.items()
        if name in names
    }


def from_reader(reader: FeedReader, specs: Sequence[InputSpec]) -> Dataset:
    """An object with ``get_next()``; each result is one feed. It is read only once: feeds
    already taken (by ``first_feed``) are replayed, and a second full pass is an error."""
    where = type(reader).__name__
    taken: list[Batch] = []
    state = {"finished": False}

    def read() -> Batch | None:
        feed = reader.get_next()
        if feed is None:
            state["finished"] = True
            return None
        if not isinstance(feed, Mapping):  # onnxruntime's readers give dicts; a list has no names
            raise DataError(
                f"{where}: get_next() returned {type(feed).__name__}: a reader must return a "
                "dict of input name -> array (or None at the end)"
            )
        feed = _owned(feed, specs)
        for spec in specs:
            if spec.name not in feed:
                raise DataError(f"{where}: a feed has no input '{spec.name}'")
            check_array(spec, feed[spec.name], where)
        return Batch(feed, samples_in(feed, specs), None)

    def make_batches() -> Iterator[Batch]:
        if state["finished"]:
            raise DataError(f"{where}: a reader can be read only once; pass a fresh one")
        # Replay what a peek took, then keep reading; only the peeked feeds stay in memory.
        yield from taken
        taken.clear()
        while (batch := read()) is not None:
            yield batch

    def peek() -> Batch | None:
        if not taken and not state["finished"]:
            batch = read()
            if batch is not None:
                taken.append(batch)
        return taken[0] if taken else None

    return Dataset(where, synthetic=False, has_labels=False, make_batches=make_batches, peek=peek)


# ---- choosing a source -----------------------------------------------------------------------


def prepare(
    specs: Sequence[InputSpec],
    source: str | Path | FeedReader | Mapping[str, np.ndarray] | Dataset | None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    labels: str | Path | None = None,
    seed: int = 0,
    held: Mapping[str, float] | None = None,
) -> Dataset:
    """The dataset a user means by ``source``: .npz, folder of .npy, test-data folders, a
    dict of arrays (an .npz's layout, in memory), a reader object, or (None) seeded synthetic
    data, with a warning that it proves nothing about accuracy.

    ``held``: inputs a pass holds at one value (``fold.freeze``): synthetic data holds that
    value, and data whose first batch gives another is warned of.

    Raises:
        DataError: the source does not exist, is of an unknown kind, or does not fit ``specs``.
    """
    if isinstance(source, Dataset):
        return source
    if labels is not None:
        _check_labels_source(source, str(labels))
    if source is None:
        dataset = synthetic(specs, input_shapes, seed=seed, held=held)
        logger.warning(
            "no --data given: running on %s; synthetic inputs say nothing about accuracy%s",
            dataset.description,
            open_dims_note(specs, input_shapes),
        )
        return dataset
    dataset = _open(source, specs)
    if labels is not None:
        dataset = _with_labels(dataset, _load_labels(labels), str(labels), source)
    dataset.first_feed()  # a bad dtype or shape is an error now, before any work is done
    _warn_held_differs(dataset, held or {})
    return dataset


def _warn_held_differs(dataset: Dataset, held: Mapping[str, float]) -> None:
    """Warn where the data's first batch gives an input other values than the one a pass
    holds it at: the original model then runs on another configuration than the result,
    and the check's error measures that difference too."""
    feed = dataset.first_feed()
    for name, value in held.items():
        if name not in feed:
            continue
        given = np.unique(np.asarray(feed[name]))
        if np.any(given != value):
            shown = ", ".join(f"{v:g}" for v in given[:3].tolist()) + (
                ", ..." if given.size > 3 else ""
            )
            logger.warning(
                "fold.freeze holds input '%s' at %g, but %s gives it %s in its first batch: "
                "the original model runs on the data's value, the result always on %g, and "
                "the check's error measures that difference too",
                name,
                value,
                dataset.description,
                shown,
                value,
            )


def _open(
    source: str | Path | FeedReader | Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> Dataset:
    if hasattr(source, "get_next"):
        return from_reader(source, specs)  # type: ignore[arg-type]
    if isinstance(source, Mapping):  # in memory, laid out as an .npz's arrays
        return from_named_arrays(source, specs, where="arrays")
    if not isinstance(source, str | os.PathLike):
        raise DataError(
            f"data of type {type(source).__name__}: give a path (.npz, folder of .npy, "
            "test_data_set_* folders), a dict of arrays, or a reader with get_next()"
        )
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".npz":
        return from_npz(path, specs)
    if path.is_dir() and any(path.glob("test_data_set_*")):
        return from_test_data_sets(path, specs)
    if path.is_dir() and any(path.glob("*.npy")):
        return from_npy_folder(path, specs)
    raise DataError(
        f"{path}: not an .npz, a folder of .npy files, or a folder of test_data_set_* folders"
    )


def _check_labels_source(
    source: str | Path | FeedReader | Mapping[str, np.ndarray] | None, where: str
) -> None:
    """Labels follow the samples of array data (.npz, .npy folder, dict) in order, one each:
    any other source cannot take them.

    Raises:
        DataError: naming the labels file, not the data's.
    """
    if source is None:
        raise DataError(
            f"{where}: labels without data: synthetic inputs have none; give the inputs they "
            "label (--data)"
        )
    path = Path(source) if isinstance(source, str | os.PathLike) else None
    if hasattr(source, "get_next") or (path is not None and any(path.glob("test_data_set_*"))):
        raise DataError(
            f"{where}: labels go with array data (.npz, a folder of .npy, a dict of arrays), "
            "whose samples they follow in order; put them in the data as a 'labels' array"
        )


def _with_labels(dataset: Dataset, labels: np.ndarray, where: str, source: object) -> Dataset:
    """``dataset`` (array data, whose sample count is known) with ``labels`` in place of any
    it holds, each batch taking the next ones in order.

    Raises:
        DataError: the counts differ, naming the labels file.
    """
    if dataset.samples is not None and dataset.samples != len(labels):
        data = "the arrays" if isinstance(source, Mapping) else str(source)
        raise DataError(
            f"{where}: {len(labels)} labels for the {dataset.samples} samples of {data}"
        )

    def make_batches() -> Iterator[Batch]:
        start = 0
        for batch in dataset.batches():
            yield Batch(batch.feed, batch.samples, labels[start : start + batch.samples])
            start += batch.samples

    return dataset.restreamed(make_batches, synthetic=False, has_labels=True, labels=labels)


def _load_labels(path: str | Path) -> np.ndarray:
    """The labels in ``path`` (.npy, or .npz with a 'labels' array), one per sample."""
    path = Path(path)
    if path.suffix == ".npz":
        arrays = data_files.load_npz(path)
        if "labels" not in arrays:
            raise DataError(f"{path}: has no 'labels' array")
        return labels_mod.per_sample(arrays["labels"], str(path))
    return labels_mod.per_sample(data_files.load_npy(path), str(path))


def unfit_hint(dataset: Dataset) -> str:
    """What to tell a user whose model fails on ``dataset``'s inputs (the error's last part)."""
    if dataset.synthetic:
        hint = (
            "Give real inputs with --data, or synthetic shapes it accepts with --input-shape "
            "NAME=DIMS"
        )
        # A random scalar (Silero VAD's sample rate) picks a branch the real data never takes.
        scalars = [name for name, value in dataset.first_feed().items() if np.ndim(value) == 0]
        if scalars:
            hint += (
                f"; a scalar input such as '{scalars[0]}' may choose a branch: "
                f"--set fold.freeze={scalars[0]}=VALUE fixes it"
            )
        return hint
    return "The data does not fit the model"


def describe_feed(feed: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={show_shape(np.shape(v))}" for k, v in feed.items())


def replayable(dataset: Dataset, stack: contextlib.ExitStack) -> Dataset:
    """``dataset`` itself when it can be read again, else a copy that spills each batch to a
    temporary folder (closed with ``stack``) as it is first read, and replays from disk after:
    a user's one-shot reader works unchanged, and memory stays at one batch."""
    if dataset.peek is None:
        return dataset
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx-shrink-calib-")))
    written: list[tuple[Path, int]] = []

    def keep(batch: Batch) -> None:
        path = folder / f"batch_{len(written):06d}.npz"
        data_files.save_npz(path, batch.feed)
        written.append((path, batch.samples))

    state: dict[str, Any] = {"spilled": False, "error": None}

    def spill() -> Iterator[Batch]:
        source = dataset.batches()
        try:
            for batch in source:
                keep(batch)
                yield batch
        finally:
            # A reader stopped early (a probe of the first samples) still has to be copied
            # whole: it cannot be read a second time. What it raises here, as the generator
            # closes, Python would only print: it is kept and raised by the next read.
            try:
                for batch in source:
                    keep(batch)
            except Exception as e:  # noqa: BLE001 - re-raised by make_batches
                state["error"] = e

    def replay() -> Iterator[Batch]:
        for path, samples in written:
            yield Batch(data_files.load_npz(path), samples, None)

    def make_batches() -> Iterator[Batch]:
        if state["error"] is not None:
            raise state["error"]
        if state["spilled"]:
            yield from replay()
        else:
            state["spilled"] = True
            yield from spill()

    copy = dataset.restreamed(make_batches)
    # The first feed from the reader's own peek (read already by ``prepare``): asking the
    # copy would start a spill and leave it half done.
    copy.knows_first_feed(dataset.first_feed())
    return copy
