"""Seeded synthetic inputs from a model's signature, and ``--input-shape`` parsing. They
say nothing about accuracy, and ``data.prepare`` says so when it makes them."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

from onnx_shrink.compiler import io
from onnx_shrink.errors import DataError, RunFailedError
from onnx_shrink.runtime_check.data_types import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    Batch,
    Dataset,
    Feed,
    InputSpec,
    samples_of,
    show_shape,
)

logger = logging.getLogger(__name__)


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x128`` strings into shapes.

    Raises:
        DataError: the text is not ``NAME=DxDx...`` with positive integers, or names an
            input twice (the last would silently win, as for ``--set``).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
            raise DataError(f"--input-shape expects NAME=1x128 (dims joined by x), got {item!r}")
        if name.strip() in shapes:
            raise DataError(f"--input-shape gives '{name.strip()}' twice; give it once")
        shapes[name.strip()] = checked_dims(name.strip(), [int(d) for d in dims.strip().split("x")])
    return shapes


def checked_dims(name: str, dims: Iterable[object]) -> tuple[int, ...]:
    """``dims`` of input ``name`` as a shape to make inputs of: positive integers, as
    ``--input-shape`` takes them (the library's ``input_shapes`` too).

    Raises:
        DataError: a dim is not an integer, or is not positive.
    """
    given = tuple(dims) if isinstance(dims, Iterable) else (None,)
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in given):
        raise DataError(f"--input-shape for '{name}' is {dims!r}: give a list of integer dims")
    shape = tuple(int(d) for d in given)  # type: ignore[arg-type]
    if any(d <= 0 for d in shape):  # 0: no sample to check on, every check would pass
        shown = "x".join(str(d) for d in shape)
        raise DataError(f"--input-shape '{name}={shown}': dims must be positive")
    return shape


def concrete_shape(
    spec: InputSpec,
    override: Sequence[int] | None,
    batch: int | None = None,
    dim: int = DEFAULT_DIM,
) -> tuple[int, ...]:
    """The shape to generate for one input: the override, else static dims, a symbolic
    first dim as ``batch`` (default 1) and any other as ``dim``."""
    if override is not None:
        if len(override) != len(spec.shape):
            raise DataError(
                f"--input-shape for '{spec.name}' has {len(override)} dims, the model expects "
                f"{len(spec.shape)} ({show_shape(spec.shape)})"
            )
        for given, declared in zip(override, spec.shape, strict=True):
            if isinstance(declared, int) and declared > 0 and given != declared:
                raise DataError(
                    f"--input-shape for '{spec.name}' is {show_shape(override)}, but the model "
                    f"fixes it to {show_shape(spec.shape)}"
                )
        return tuple(override)
    first = batch if batch is not None else DEFAULT_BATCH
    return tuple(
        d if isinstance(d, int) and d > 0 else (first if i == 0 else dim)
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
    return _draw(specs, synthetic_shapes(specs, shapes, batch), seed)


def _draw(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    held: Mapping[str, float] | None = None,
) -> Feed:
    rng = np.random.default_rng(seed)
    feed = {spec.name: _random_array(rng, spec, shapes[spec.name]) for spec in specs}
    # Drawn first, then overwritten: the other inputs stay those of the same seed without it.
    held = held or {}
    for spec in specs:
        if spec.name in held:
            feed[spec.name] = np.full(shapes[spec.name], held[spec.name]).astype(spec.dtype)
    return feed


def synthetic_shapes(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
    dim: int = DEFAULT_DIM,
) -> dict[str, tuple[int, ...]]:
    """The shape of each input in ``synthetic_feed``'s feed, without drawing it; symbolic
    dims no shape gives are ``batch`` on a first axis, ``dim`` elsewhere."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"--input-shape names {', '.join(sorted(unknown))}, which the model does not have "
            f"(inputs: {', '.join(s.name for s in specs)})"
        )
    # A named dim is one size in every input: the batch's where it is any input's first
    # axis (voicefilter's stacked_logmel [batch, time, 512] and h0 [3, batch, 512] got 1 and
    # 16, and onnxruntime refused the sample); and a dim given for one input is that dim
    # everywhere: input_ids=2x64 makes attention_mask [batch_size, sequence_length] 2x64.
    first = batch if batch is not None else DEFAULT_BATCH
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    bound = {
        name: first if name in batch_names else dim
        for spec in specs
        for name in spec.shape
        if isinstance(name, str) and name
    }
    bound.update(
        (dim, given)
        for spec in specs
        if spec.name in shapes
        for dim, given in zip(spec.shape, shapes[spec.name], strict=False)
        if isinstance(dim, str) and dim
    )
    for spec in specs:
        if spec.name not in shapes and any(d in bound for d in spec.shape if isinstance(d, str)):
            default = concrete_shape(spec, None, batch, dim)
            shapes[spec.name] = tuple(
                bound.get(d, x) if isinstance(d, str) else x
                for d, x in zip(spec.shape, default, strict=True)
            )
    return {spec.name: concrete_shape(spec, shapes.get(spec.name), batch, dim) for spec in specs}


def open_dims_note(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None) -> str:
    """ ", and 16 stands for the dims the model leaves open (x's h and w): ..." where
    ``synthetic_shapes`` gives a dim past the batch ``DEFAULT_DIM`` (none given it), else "":
    PP-OCR's direction classifier, benchmarked without data, was timed at 3x16x16 for its
    3x48x192 text lines, unsaid."""
    filled = synthetic_shapes(specs, shapes)
    other = synthetic_shapes(specs, shapes, dim=DEFAULT_DIM + 1)
    named = []
    for spec in specs:
        shape, changed = filled[spec.name], other[spec.name]
        labels = [
            spec.shape[i] if isinstance(spec.shape[i], str) and spec.shape[i] else f"dim {i}"
            for i in range(len(shape))
            if shape[i] != changed[i]
        ]
        if labels:
            named.append(f"{spec.name}'s {' and '.join(dict.fromkeys(labels))}")
    if not named:
        return ""
    return (
        f", and {DEFAULT_DIM} stands for the dims the model leaves open ({'; '.join(named)}): "
        "timings and memory are of that size (--input-shape sets them)"
    )


def synthetic(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
    held: Mapping[str, float] | None = None,
    dim: int = DEFAULT_DIM,
) -> Dataset:
    """A one-batch dataset of seeded random inputs, symbolic dims no shape gives as 1 on a
    first axis and ``dim`` elsewhere. Says nothing about accuracy. They are
    drawn when first read: a data-free pass (nearest-rounded quant-weight, magnitude prune)
    makes a pipeline hold calibration data it never reads, and a model's static input may
    be a gigabyte. ``held``: inputs that hold one value in every element (``fold.freeze``'s:
    a random sample rate took Silero VAD's other branch, which failed on the 16 kHz frame)."""
    concrete = synthetic_shapes(specs, shapes, dim=dim)
    held = {name: value for name, value in (held or {}).items() if name in concrete}
    shown = ", ".join(
        f"{name}={show_shape(shape)}" + (f" of {held[name]:g}" if name in held else "")
        for name, shape in concrete.items()
    )
    samples = samples_of(concrete, specs)
    draw = functools.cache(functools.partial(_draw, specs, concrete, seed, held))
    return Dataset(
        description=f"synthetic, seed {seed}: {shown}",
        synthetic=True,
        has_labels=False,
        make_batches=lambda: iter([Batch(draw(), samples, None)]),
        samples=samples,
    )


GROWN_DIMS = (64, 256)
"""What ``preflight`` tries the default dims at, in turn, when a model fails on synthetic
inputs of ``DEFAULT_DIM``: detectors and segmenters need images divisible by 32 (YOLOv8n,
PP-OCRv4 det failed at 16x16)."""


def growable(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None) -> bool:
    """Whether a synthetic dim would grow (``grown``): not where every dim is given or fixed,
    nor where only the batch dim is free (the same dims take any size)."""
    return synthetic_shapes(specs, shapes, dim=GROWN_DIMS[0]) != synthetic_shapes(specs, shapes)


def grown(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    held: Mapping[str, float] | None = None,
) -> Iterator[Dataset]:
    """``synthetic``'s datasets with the symbolic dims no shape gives at each of
    ``GROWN_DIMS``; none where nothing can grow (``growable``)."""
    if not growable(specs, shapes):
        return
    for dim in GROWN_DIMS:
        yield synthetic(specs, shapes, held=held, dim=dim)


Ran = TypeVar("Ran")


def first_that_runs(
    dataset: Dataset,
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None,
    try_run: Callable[[Dataset], Ran],
    *,
    label: str,
    purpose: str,
    held: Mapping[str, float] | None = None,
) -> Ran:
    """``try_run(dataset)``; where that raises ``RunFailedError`` on synthetic inputs,
    ``try_run`` of each ``grown`` dataset in turn, the first that runs, with a warning naming
    what failed and what ran instead, ``purpose`` (e.g. "for the check"). Where none runs,
    the failure on the defaults is raised (its hint names ``--input-shape``)."""
    try:
        return try_run(dataset)
    except RunFailedError as failure:
        if not dataset.synthetic:
            raise
        for larger in grown(specs, shapes, held=held):
            try:
                result = try_run(larger)
            except RunFailedError:
                continue
            logger.warning(
                "%s failed on %s (%s); running on %s instead, %s (give --input-shape to choose)",
                label,
                dataset.description,
                io.first_line(failure.__cause__ or failure)[:160],
                larger.description,
                purpose,
            )
            return result
        raise


SYNTHETIC_INT_LIMIT = 100
"""Synthetic integers lie in [0, this), or below an input's ``index_limit``"""


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype is np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar otherwise
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    # Small non-negative integers are valid ids, indices and token ids for most models; below
    # the rows of the tables a Gather looks them up in, where the model has such a Gather.
    high = SYNTHETIC_INT_LIMIT if spec.index_limit is None else spec.index_limit
    return rng.integers(0, max(min(high, SYNTHETIC_INT_LIMIT), 1), size=shape).astype(spec.dtype)
