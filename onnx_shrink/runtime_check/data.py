"""Inputs for running models: files, folders, reader objects, or seeded synthetic data.

Every source becomes a ``Dataset``: a re-iterable (except reader objects, which are read
once) stream of ``Batch``es, each a feed for one ``session.run`` plus the labels of its
samples. Memory is bounded by one batch whatever the number of samples.

Sample conventions for arrays (``.npz``, folders of ``.npy``, or a dict of arrays in memory),
decided per input:

* rank = input rank + 1: each entry along axis 0 is one complete value of the input (this is
  how scalars, states and fixed-batch inputs are given);
* rank = input rank: samples lie along the input's own first (batch) axis;
* a scalar input given as a scalar: the same value for every sample (a sample rate).

When every input uses the second form, samples are fed in batches of up to ``MAX_BATCH``
(or the model's fixed batch size); otherwise one sample per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import DataError

logger = logging.getLogger(__name__)

# Symbolic dims without --input-shape: the first (batch) is 1, any other is 16. Printed when
# used, so nobody mistakes the numbers for their real workload.
DEFAULT_BATCH = 1
DEFAULT_DIM = 16
MAX_BATCH = 64

Feed = dict[str, np.ndarray]


class FeedReader(Protocol):
    """Anything with ``get_next() -> dict | None``, like onnxruntime's CalibrationDataReader."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, and dims (int, symbolic name, or None)."""

    name: str
    dtype: type
    shape: tuple[int | str | None, ...]

    @property
    def batch_axis(self) -> bool:
        """Whether samples lie along the first axis: it exists and is not a fixed size > 0."""
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] > 0)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One feed and the labels of the samples it holds (None without labels)."""

    feed: Feed
    samples: int
    labels: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A stream of batches and where it came from. ``batches()`` starts from the beginning."""

    description: str
    synthetic: bool
    has_labels: bool
    make_batches: Callable[[], Iterator[Batch]]
    peek: Callable[[], Batch | None] | None = None
    """the first batch without consuming it (one-shot sources); None: read batches()"""
    samples: int | None = None
    """how many samples it holds, where that is known without reading them (None: a reader's)"""
    _first: dict[str, Feed] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def batches(self) -> Iterator[Batch]:
        for batch in self.make_batches():
            self._first.setdefault("feed", batch.feed)
            yield batch

    def first_feed(self) -> Feed:
        """The first batch's feed, checked against the model's inputs; kept once read."""
        if "feed" not in self._first:
            first = self.peek() if self.peek is not None else next(self.batches(), None)
            if first is None:
                raise DataError(f"{self.description}: holds no samples")
            self._first["feed"] = first.feed
        return self._first["feed"]


def specs_from_model(model: ir.Model) -> list[InputSpec]:
    """Input specs from a model's graph inputs (initializers that are also inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None or value.shape is None:
            raise DataError(f"input '{value.name}' has no declared type or shape")
        dims = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        specs.append(InputSpec(name=value.name, dtype=value.dtype.numpy().type, shape=dims))
    return specs


def _show(shape: Sequence[object]) -> str:
    return "x".join("?" if d is None or isinstance(d, str) else str(d) for d in shape) or "scalar"


def check_array(spec: InputSpec, array: np.ndarray, where: str) -> None:
    """Raise ``DataError`` when a fed array's dtype, rank or fixed dims do not fit the input."""
    if array.dtype != np.dtype(spec.dtype):
        raise DataError(
            f"{where}: input '{spec.name}' is {array.dtype}, the model expects "
            f"{np.dtype(spec.dtype).name}"
        )
    if array.ndim != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {_show(array.shape)}, the model expects "
            f"{_show(spec.shape)}"
        )
    for axis, (got, declared) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if isinstance(declared, int) and declared > 0 and got != declared:
            raise DataError(
                f"{where}: input '{spec.name}' has {got} on axis {axis}, the model fixes it to "
                f"{declared} (shape {_show(spec.shape)})"
            )


# ---- arrays (.npz, folders of .npy) -------------------------------------------------------


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    labels: np.ndarray | None,
    where: str,
) -> Dataset:
    """A dataset over in-memory arrays with samples on axis 0 (see the module docstring)."""
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
                f"{where}: input '{spec.name}' has shape {_show(arrays[spec.name].shape)}; "
                f"expected {_show(spec.shape)} with samples on the first axis, or "
                f"N x {_show(spec.shape)}"
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
            f"fixes (input '{fixed.name}' is {_show(fixed.shape)}): give a multiple of {step}"
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
    )


def _batch_step(fixed: InputSpec | None) -> int:
    """Samples a batch holds: the model's fixed batch (``_fixed_batch_input``), else up to
    ``MAX_BATCH``."""
    return fixed.shape[0] if fixed is not None else MAX_BATCH  # type: ignore[return-value]


def _fixed_batch_input(specs: Sequence[InputSpec]) -> InputSpec | None:
    """The first input whose first dim the model fixes (None: every batch axis is dynamic)."""
    return next((s for s in specs if s.shape and not s.batch_axis), None)


def from_npz(
    path: str | Path, specs: Sequence[InputSpec], labels: np.ndarray | None = None
) -> Dataset:
    """``.npz`` with one array per input and optional ``labels``."""
    return _from_named_arrays(data_files.load_npz(path), specs, labels, where=str(path))


def _from_named_arrays(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    labels: np.ndarray | None,
    where: str,
) -> Dataset:
    """One array per input plus optional ``labels`` among them (``labels`` given wins)."""
    arrays = dict(arrays)
    stored = arrays.pop("labels", None)
    given = labels if labels is not None else stored
    return from_arrays(
        arrays, specs, labels=None if given is None else np.asarray(given), where=where
    )


def from_npy_folder(
    path: str | Path, specs: Sequence[InputSpec], labels: np.ndarray | None = None
) -> Dataset:
    """A folder holding ``<input name>.npy`` per input and optional ``labels.npy``."""
    folder = Path(path)
    arrays = {p.stem: data_files.load_npy(p) for p in sorted(folder.glob("*.npy"))}
    stored_labels = arrays.pop("labels", None)
    return from_arrays(
        arrays, specs, labels=labels if labels is not None else stored_labels, where=str(folder)
    )


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
        feed = {name: np.asarray(value) for name, value in feed.items()}
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


def samples_in(feed: Feed, specs: Sequence[InputSpec]) -> int:
    """Samples in a feed: the first dynamic axis's length (1 when every shape is fixed)."""
    for spec in specs:
        if spec.batch_axis:
            return int(feed[spec.name].shape[0])
    return 1


# ---- synthetic -------------------------------------------------------------------------------


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x128`` strings into shapes.

    Raises:
        DataError: the text is not ``NAME=DxDx...`` with positive integers.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
            raise DataError(f"--input-shape expects NAME=1x128 (dims joined by x), got {item!r}")
        shapes[name.strip()] = tuple(int(d) for d in dims.strip().split("x"))
        if 0 in shapes[name.strip()]:  # no sample to check on: every check would pass
            raise DataError(f"--input-shape {item!r}: dims must be positive")
    return shapes


def concrete_shape(
    spec: InputSpec, override: Sequence[int] | None, batch: int | None = None
) -> tuple[int, ...]:
    """The shape to generate for one input: the override, else static dims with defaults."""
    if override is not None:
        if len(override) != len(spec.shape):
            raise DataError(
                f"--input-shape for '{spec.name}' has {len(override)} dims, the model expects "
                f"{len(spec.shape)} ({_show(spec.shape)})"
            )
        for given, declared in zip(override, spec.shape, strict=True):
            if isinstance(declared, int) and declared > 0 and given != declared:
                raise DataError(
                    f"--input-shape for '{spec.name}' is {_show(override)}, but the model fixes "
                    f"it to {_show(spec.shape)}"
                )
        return tuple(override)
    first = batch if batch is not None else DEFAULT_BATCH
    return tuple(
        d if isinstance(d, int) and d > 0 else (first if i == 0 else DEFAULT_DIM)
        for i, d in enumerate(spec.shape)
    )


def synthetic_feed(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
    batch: int | None = None,
) -> Feed:
    """One seeded random feed from the signature; ``batch`` sets every dynamic first dim."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"--input-shape names {', '.join(sorted(unknown))}, which the model does not have "
            f"(inputs: {', '.join(s.name for s in specs)})"
        )
    # A symbolic dim given for one input is that dim everywhere: input_ids=2x64 makes
    # attention_mask [batch_size, sequence_length] 2x64 too, not 1x16 (onnxruntime fails).
    bound = {
        dim: given
        for spec in specs
        if spec.name in shapes
        for dim, given in zip(spec.shape, shapes[spec.name], strict=False)
        if isinstance(dim, str) and dim
    }
    for spec in specs:
        if spec.name not in shapes and any(d in bound for d in spec.shape if isinstance(d, str)):
            default = concrete_shape(spec, None, batch)
            shapes[spec.name] = tuple(
                bound.get(d, x) if isinstance(d, str) else x
                for d, x in zip(spec.shape, default, strict=True)
            )
    rng = np.random.default_rng(seed)
    return {
        spec.name: _random_array(rng, spec, concrete_shape(spec, shapes.get(spec.name), batch))
        for spec in specs
    }


def synthetic(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
) -> Dataset:
    """A one-batch dataset of seeded random inputs. Says nothing about accuracy."""
    feed = synthetic_feed(specs, shapes, seed=seed)
    shown = ", ".join(f"{name}={_show(array.shape)}" for name, array in feed.items())
    return Dataset(
        description=f"synthetic, seed {seed}: {shown}",
        synthetic=True,
        has_labels=False,
        make_batches=lambda: iter([Batch(feed, samples_in(feed, specs), None)]),
        samples=samples_in(feed, specs),
    )


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype is np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar otherwise
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    # Small non-negative integers are valid ids, indices and token ids for most models.
    return rng.integers(0, 100, size=shape).astype(spec.dtype)


# ---- choosing a source -----------------------------------------------------------------------


def prepare(
    specs: Sequence[InputSpec],
    source: str | Path | FeedReader | Mapping[str, np.ndarray] | Dataset | None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    labels: str | Path | None = None,
    seed: int = 0,
) -> Dataset:
    """The dataset a user means by ``source``: .npz, folder of .npy, test-data folders, a
    dict of arrays (an .npz's layout, in memory), a reader object, or (None) seeded synthetic
    data, with a warning that it proves nothing about accuracy.

    Raises:
        DataError: the source does not exist, is of an unknown kind, or does not fit ``specs``.
    """
    if isinstance(source, Dataset):
        return source
    label_array = _load_labels(labels) if labels is not None else None
    if label_array is not None:
        _check_labels_fit(source, specs, label_array, str(labels))
    if source is None:
        dataset = synthetic(specs, input_shapes, seed=seed)
        logger.warning(
            "no --data given: running on %s; synthetic inputs say nothing about accuracy",
            dataset.description,
        )
        return dataset
    dataset = _open(source, specs, label_array)
    dataset.first_feed()  # a bad dtype or shape is an error now, before any work is done
    return dataset


def _open(
    source: str | Path | FeedReader | Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    labels: np.ndarray | None,
) -> Dataset:
    if hasattr(source, "get_next"):
        return from_reader(source, specs)  # type: ignore[arg-type]
    if isinstance(source, Mapping):  # in memory, laid out as an .npz's arrays
        return _from_named_arrays(source, specs, labels, where="arrays")
    if not isinstance(source, str | os.PathLike):
        raise DataError(
            f"data of type {type(source).__name__}: give a path (.npz, folder of .npy, "
            "test_data_set_* folders), a dict of arrays, or a reader with get_next()"
        )
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".npz":
        return from_npz(path, specs, labels)
    if path.is_dir() and any(path.glob("test_data_set_*")):
        return from_test_data_sets(path, specs)
    if path.is_dir() and any(path.glob("*.npy")):
        return from_npy_folder(path, specs, labels)
    raise DataError(
        f"{path}: not an .npz, a folder of .npy files, or a folder of test_data_set_* folders"
    )


def _check_labels_fit(
    source: str | Path | FeedReader | Mapping[str, np.ndarray] | None,
    specs: Sequence[InputSpec],
    labels: np.ndarray,
    where: str,
) -> None:
    """Labels follow the samples of array data (.npz, .npy folder, dict) in order, one each:
    any other source cannot take them, and the counts must agree.

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
    samples = _open(source, specs, None).samples  # type: ignore[arg-type]
    if samples is not None and samples != len(labels):
        data = "the arrays" if isinstance(source, Mapping) else str(source)
        raise DataError(f"{where}: {len(labels)} labels for the {samples} samples of {data}")


def _load_labels(path: str | Path) -> np.ndarray:
    path = Path(path)
    if path.suffix == ".npz":
        arrays = data_files.load_npz(path)
        if "labels" not in arrays:
            raise DataError(f"{path}: has no 'labels' array")
        return arrays["labels"]
    return data_files.load_npy(path)


def unfit_hint(dataset: Dataset) -> str:
    """What to tell a user whose model fails on ``dataset``'s inputs (the error's last part)."""
    if dataset.synthetic:
        return (
            "Give real inputs with --data, or synthetic shapes it accepts with --input-shape "
            "NAME=DIMS"
        )
    return "The data does not fit the model"


def describe_feed(feed: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_show(np.shape(v))}" for k, v in feed.items())


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

    def spill() -> Iterator[Batch]:
        source = dataset.batches()
        try:
            for batch in source:
                keep(batch)
                yield batch
        finally:
            # A reader stopped early (a probe of the first samples) still has to be copied
            # whole: it cannot be read a second time.
            for batch in source:
                keep(batch)

    def replay() -> Iterator[Batch]:
        for path, samples in written:
            yield Batch(data_files.load_npz(path), samples, None)

    state = {"spilled": False}

    def make_batches() -> Iterator[Batch]:
        if state["spilled"]:
            yield from replay()
        else:
            state["spilled"] = True
            yield from spill()

    return Dataset(
        dataset.description,
        dataset.synthetic,
        dataset.has_labels,
        make_batches,
        samples=dataset.samples,
    )
