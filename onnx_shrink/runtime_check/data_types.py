"""The shapes of model inputs and of the data fed to them: ``InputSpec``, ``Batch``,
``Dataset`` and the checks every data source shares (see ``data`` for the sources)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnx_shrink.errors import DataError

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
    index_limit: int | None = None
    """for an integer input the model reads as Gather indices (an embedding's token ids): the
    rows of the smallest table it indexes, which synthetic values stay below"""

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
    labels: np.ndarray | None = None
    """every sample's label, in order, where the source holds them all at hand (array data,
    one per sample: ``labels.per_sample``; whether they can score accuracy is the check's to
    say); None elsewhere, where ``has_labels`` says whether batches carry any"""
    whole_samples: bool = False
    """each batch is one sample given whole (arrays with one more axis than their inputs): an
    input's first axis is then the sample's own, which may be time or frames, not a batch,
    so samples are never joined along it, nor is it counted as 1 per sample"""
    independent_samples: bool = False
    """a model was found to give each sample the same outputs joined with another as alone
    (``batch_mixing.vetted``): readers may join its samples without trying again"""
    _first: dict[str, Feed] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def restreamed(self, make_batches: Callable[[], Iterator[Batch]], **changes) -> Dataset:
        """This dataset over other batches (``changes``: fields that differ too): no peek and
        no first feed of its own, and every other field, new ones included, carried over."""
        return dataclasses.replace(self, make_batches=make_batches, peek=None, _first={}, **changes)

    def batches(self) -> Iterator[Batch]:
        for batch in self.make_batches():
            self._first.setdefault("feed", batch.feed)
            yield batch

    def knows_first_feed(self, feed: Feed) -> None:
        """Take ``feed`` as the first batch's (a copy of a one-shot source, whose own peek
        read it), so that ``first_feed`` reads nothing."""
        self._first["feed"] = feed

    def samples_in(self, feed: Feed, specs: Sequence[InputSpec]) -> int:
        """Samples in one of this dataset's feeds (``samples_in``; 1 for whole samples)."""
        return 1 if self.whole_samples else samples_in(feed, specs)

    def first_sample(self, specs: Sequence[InputSpec]) -> Feed:
        """The first feed cut to its first sample: batch axes sliced to 1, whole samples as
        they are."""
        feed = self.first_feed()
        if self.whole_samples:
            return feed
        batched = {s.name for s in specs if s.batch_axis}
        return {k: v[:1] if k in batched else v for k, v in feed.items()}

    def first_feed(self) -> Feed:
        """The first batch's feed, checked against the model's inputs; kept once read."""
        if "feed" not in self._first:
            first = self.peek() if self.peek is not None else next(self.batches(), None)
            if first is None:
                raise DataError(f"{self.description}: holds no samples")
            self._first["feed"] = first.feed
        return self._first["feed"]


def declared_dims(shape: ir.Shape) -> list[int | str | None]:
    """A declared shape's dims: ints where fixed, the names (or None) of the others."""
    return [d if isinstance(d, int) else d.value for d in shape]


def specs_from_model(model: ir.Model) -> list[InputSpec]:
    """Input specs from a model's graph inputs (initializers that are also inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None or value.shape is None:
            raise DataError(f"input '{value.name}' has no declared type or shape")
        dims = tuple(declared_dims(value.shape))
        dtype = value.dtype.numpy().type
        limit = _index_limit(value) if np.issubdtype(dtype, np.integer) else None
        specs.append(InputSpec(name=value.name, dtype=dtype, shape=dims, index_limit=limit))
    return specs


VALUE_CARRIERS = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
"""Ops that pass their first input's values on unchanged (in another layout or type): an
index tensor on its way to a Gather, class scores on their way to an output."""
# Arithmetic an index may pass through too: exporters wrap negative ids into range
# (tf2onnx's GatherV2: Where(ids < 0, ids + rows, ids), written with Add and Mul on a mask).
# A table reached this way may bound ids it does not take; the limit is the smallest table's,
# and ids below a table's rows stay valid however they are combined on the way.
_INDEX_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Where", "Min", "Max", "Abs"})
_INDEX_DEPTH = 6


def _index_limit(value: ir.Value, depth: int = _INDEX_DEPTH) -> int | None:
    """The rows of the smallest table of known size a Gather indexes with ``value``, directly
    or through ``VALUE_CARRIERS`` and ``_INDEX_ARITHMETIC`` (None: no such Gather)."""
    limits = []
    for node, index in value.uses():
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
            rows = _table_rows(node)
            if rows is not None:
                limits.append(rows)
            continue
        carried = node.op_type in VALUE_CARRIERS and index == 0
        # Where's first input is its condition, not a value it passes on.
        computed = node.op_type in _INDEX_ARITHMETIC and not (
            node.op_type == "Where" and index == 0
        )
        if (carried or computed) and depth > 0:
            limits += [limit for out in node.outputs if (limit := _index_limit(out, depth - 1))]
    return min(limits) if limits else None


def _table_rows(gather: ir.Node) -> int | None:
    """Rows of the table ``gather`` indexes along its axis: a constant's, or a static shape's
    (a half-precision model's table is often a Cast of its initializer)."""

    def static_shape(value: ir.Value | None) -> ir.Shape | None:
        # A value made constant by a pass has no shape of its own: its tensor's.
        if value is None:
            return None
        return value.const_value.shape if value.const_value is not None else value.shape

    table = gather.inputs[0]
    shape = static_shape(table)
    producer = table.producer() if table is not None else None
    if shape is None and producer is not None and producer.op_type in ("Cast", "Identity"):
        shape = static_shape(producer.inputs[0])
    if shape is None:
        return None
    axis = gather.attributes.get_int("axis", 0)
    if not -len(shape) <= axis < len(shape):
        return None
    rows = shape[axis]
    return int(rows) if isinstance(rows, int) and rows > 0 else None


def show_shape(shape: Sequence[object]) -> str:
    return "x".join("?" if d is None or isinstance(d, str) else str(d) for d in shape) or "scalar"


def check_array(spec: InputSpec, array: np.ndarray, where: str) -> None:
    """Raise ``DataError`` when a fed array's dtype, rank or fixed dims do not fit the input.
    A string input takes numpy's str arrays (what ``np.savez`` stores without pickling) as
    onnxruntime does, or object arrays."""
    strings = np.dtype(spec.dtype) == np.dtype(object) and array.dtype.kind == "U"
    if array.dtype != np.dtype(spec.dtype) and not strings:
        raise DataError(
            f"{where}: input '{spec.name}' is {array.dtype}, the model expects "
            f"{np.dtype(spec.dtype).name}"
        )
    if array.ndim != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {show_shape(array.shape)}, the model expects "
            f"{show_shape(spec.shape)}"
        )
    for axis, (got, declared) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if isinstance(declared, int) and declared > 0 and got != declared:
            raise DataError(
                f"{where}: input '{spec.name}' has {got} on axis {axis}, the model fixes it to "
                f"{declared} (shape {show_shape(spec.shape)})"
            )


def samples_in(feed: Feed, specs: Sequence[InputSpec]) -> int:
    """Samples in a feed: the first dynamic axis's length (1 when every shape is fixed)."""
    return samples_of({name: array.shape for name, array in feed.items()}, specs)


def samples_of(shapes: Mapping[str, Sequence[int]], specs: Sequence[InputSpec]) -> int:
    """Samples in inputs of ``shapes`` (``samples_in``, before they are drawn or read)."""
    for spec in specs:
        if spec.batch_axis:
            return int(shapes[spec.name][0])
    return 1


def is_numeric(array: np.ndarray) -> bool:
    """A numeric or boolean array: one the comparison measures (onnxruntime returns string
    tensors as object arrays)."""
    return np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
