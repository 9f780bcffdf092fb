"""Array sources for ``data``: ``.npz`` files, folders of ``.npy``, dicts of arrays (see
``data``'s module docstring for the sample conventions)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import DataError
from onnx_shrink.runtime_check import labels as labels_mod
from onnx_shrink.runtime_check.data_types import (
    MAX_BATCH,
    Batch,
    Dataset,
    InputSpec,
    check_array,
    show_shape,
)

logger = logging.getLogger("onnx_shrink.runtime_check.data")


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    labels: np.ndarray | None,
    where: str,
) -> Dataset:
    """A dataset over in-memory arrays with samples on axis 0 (see the module docstring).

    Raises:
        DataError: an array does not fit its input, the counts differ, or ``labels`` is one
            value, not one per sample. Whether labels can score accuracy is the check's to
            say (``labels.scored_classes``): calibration reads none.
    """
    if labels is not None:
        labels = labels_mod.per_sample(labels, where)
    _warn_unread(arrays, specs, where)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(
            f"{where}: no array for input '{missing[0]}' (arrays: {', '.join(arrays) or 'none'})"
        )
    # Per input: "entries" (one more axis: one value per entry), "batch" (samples along its
    # own first axis) or "shared" (a scalar given once: every sample's value).
    layout = {}
    for spec in specs:
        rank, given = len(spec.shape), arrays[spec.name].ndim
        if given == rank + 1:
            layout[spec.name] = "entries"
        elif given == rank:
            layout[spec.name] = "batch" if rank > 0 else "shared"
        else:
            raise DataError(
                f"{where}: input '{spec.name}' has shape {show_shape(arrays[spec.name].shape)}; "
                f"expected {show_shape(spec.shape)} with samples on the first axis, or "
                f"N x {show_shape(spec.shape)}"
            )
    counts = {len(arrays[name]) for name, how in layout.items() if how != "shared"}
    counts = counts or ({1} if layout else set())  # scalars only: one sample
    counts |= {len(labels)} if labels is not None else set()
    if len(counts) > 1:
        raise DataError(f"{where}: arrays hold different numbers of samples: {sorted(counts)}")
    total = counts.pop() if counts else 0
    fixed = _fixed_batch_input(specs)
    step = 1 if "entries" in layout.values() else _batch_step(fixed)
    if fixed is not None and total % step:  # the model fixes the batch: every run is full
        raise DataError(
            f"{where}: {total} samples do not fill batches of {step}, the batch size the model "
            f"fixes (input '{fixed.name}' is {show_shape(fixed.shape)}): give a multiple of {step}"
        )

    def take(name: str, start: int, stop: int) -> np.ndarray:
        how, array = layout[name], arrays[name]
        if how == "batch":
            return array[start:stop]
        return np.asarray(array[start] if how == "entries" else array)

    def make_batches() -> Iterator[Batch]:
        for start in range(0, total, step):
            stop = min(start + step, total)
            feed = {s.name: take(s.name, start, stop) for s in specs}
            for spec in specs:
                check_array(spec, feed[spec.name], where)
            yield Batch(feed, stop - start, labels[start:stop] if labels is not None else None)
            # Read: a memory-mapped file's pages go back (a run still reading them
            # faults them in again), so a long .npz costs one batch, not its size.
            for array in feed.values():
                data_files.release_pages(array)

    return Dataset(
        where,
        synthetic=False,
        has_labels=labels is not None,
        make_batches=make_batches,
        samples=total,
        labels=labels,
        whole_samples="entries" in layout.values(),
    )


_WARNED_UNREAD: set[tuple[str, tuple[str, ...]]] = set()


def _warn_unread(arrays: Mapping[str, object], specs: Sequence[InputSpec], where: str) -> None:
    """Arrays named after no input are not fed: a misspelt name of an input with a default
    value would silently run on the default. Said once per source (calibration and the
    check may read the same file)."""
    unread = tuple(sorted(set(arrays) - {s.name for s in specs}))
    if unread and (where, unread) not in _WARNED_UNREAD:
        _WARNED_UNREAD.add((where, unread))
        logger.warning(
            "%s: array%s %s name%s no input of the model and %s not fed (inputs: %s)",
            where,
            "s" if len(unread) > 1 else "",
            ", ".join(f"'{n}'" for n in unread),
            "" if len(unread) > 1 else "s",
            "are" if len(unread) > 1 else "is",
            ", ".join(s.name for s in specs),
        )


def _batch_step(fixed: InputSpec | None) -> int:
    """Samples a batch holds: the model's fixed batch (``_fixed_batch_input``), else up to
    ``MAX_BATCH``."""
    return fixed.shape[0] if fixed is not None else MAX_BATCH  # type: ignore[return-value]


def _fixed_batch_input(specs: Sequence[InputSpec]) -> InputSpec | None:
    """The first input whose first dim the model fixes (None: every batch axis is dynamic)."""
    return next((s for s in specs if s.shape and not s.batch_axis), None)


def from_npz(path: str | Path, specs: Sequence[InputSpec]) -> Dataset:
    """``.npz`` with one array per input and optional ``labels``."""
    return from_named_arrays(data_files.load_npz(path), specs, where=str(path))


def from_named_arrays(
    arrays: Mapping[str, object], specs: Sequence[InputSpec], where: str
) -> Dataset:
    """One array (or list) per input plus optional ``labels`` among them."""
    arrays = {name: as_input(value, specs, name, copy=False) for name, value in arrays.items()}
    labels = arrays.pop("labels", None)
    return from_arrays(arrays, specs, labels=labels, where=where)


def from_npy_folder(path: str | Path, specs: Sequence[InputSpec]) -> Dataset:
    """A folder holding ``<input name>.npy`` per input and optional ``labels.npy``."""
    folder = Path(path)
    arrays = {p.stem: data_files.load_npy(p) for p in sorted(folder.glob("*.npy"))}
    return from_named_arrays(arrays, specs, where=str(folder))


def as_input(value: object, specs: Sequence[InputSpec], name: str, copy: bool) -> np.ndarray:
    """``value`` as an array: a list, which onnxruntime takes, made the input's type (numpy
    would make Python floats float64); an array as it is, or a copy of it."""
    if isinstance(value, np.ndarray):
        return value.copy() if copy else value
    dtype = next((spec.dtype for spec in specs if spec.name == name), None)
    return np.array(value, dtype)
