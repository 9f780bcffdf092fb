"""Inputs for running models: ``.npz`` files or seeded synthetic data from the signature.

A ``Dataset`` holds arrays with samples on the first axis (one entry per model input) and
optional ``labels``; ``batches`` yields feeds of bounded size so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.errors import DataError

logger = logging.getLogger(__name__)

# Symbolic dims without --input-shape: the first (batch) is 1, any other is 16. Printed when
# used, so nobody mistakes the numbers for their real workload.
DEFAULT_BATCH = 1
DEFAULT_DIM = 16
MAX_BATCH = 64

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, and dims (int, symbolic name, or None)."""

    name: str
    dtype: type
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg: object) -> InputSpec:
        type_name = arg.type
        if type_name not in _ORT_TYPES:
            raise DataError(f"input '{arg.name}' has type {type_name}, which is not supported")
        return cls(name=arg.name, dtype=_ORT_TYPES[type_name], shape=tuple(arg.shape))


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


def prepare(
    specs: Sequence[InputSpec],
    data_path: str | Path | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    *,
    seed: int = 0,
) -> Dataset:
    """The check's inputs: ``data_path`` if given, else seeded synthetic data (with a warning)."""
    if data_path is not None:
        return from_npz(data_path, specs)
    dataset = synthetic(specs, input_shapes, seed=seed)
    logger.warning(
        "no --data given: checking on %s; synthetic inputs say nothing about accuracy",
        dataset.description,
    )
    return dataset


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays with samples on axis 0, optional labels, and where they came from."""

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    synthetic: bool
    description: str

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0


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
    return shapes


def concrete_shape(spec: InputSpec, override: Sequence[int] | None) -> tuple[int, ...]:
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
    return tuple(
        d if isinstance(d, int) and d > 0 else (DEFAULT_BATCH if i == 0 else DEFAULT_DIM)
        for i, d in enumerate(spec.shape)
    )


def _show(shape: Sequence[object]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def synthetic(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
) -> Dataset:
    """Seeded random inputs from the signature. Says nothing about accuracy; callers warn."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"--input-shape names {', '.join(sorted(unknown))}, which the model does not have "
            f"(inputs: {', '.join(s.name for s in specs)})"
        )
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    chosen = []
    for spec in specs:
        shape = concrete_shape(spec, shapes.get(spec.name))
        arrays[spec.name] = _random_array(rng, spec, shape)
        chosen.append(f"{spec.name}={_show(shape)}")
    return Dataset(
        arrays={k: v[np.newaxis] for k, v in arrays.items()},
        labels=None,
        synthetic=True,
        description=f"synthetic, seed {seed}: {', '.join(chosen)}",
    )


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype is np.bool_:
        return rng.random(shape) < 0.5
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    # Small non-negative integers are valid ids, indices and token ids for most models.
    return rng.integers(0, 100, size=shape).astype(spec.dtype)


def from_npz(path: str | Path, specs: Sequence[InputSpec]) -> Dataset:
    """Read an ``.npz`` with one array per input (samples on axis 0) and optional ``labels``.

    Raises:
        DataError: an input is missing, or an array's dtype or rank does not fit the input.
    """
    arrays = io.load_npz(path)
    labels = arrays.pop("labels", None)
    result: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(
                f"{path}: no array for input '{spec.name}' (arrays: {', '.join(arrays) or 'none'})"
            )
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise DataError(
                f"{path}: input '{spec.name}' is {array.dtype}, the model expects "
                f"{np.dtype(spec.dtype).name}"
            )
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{path}: input '{spec.name}' has shape {_show(array.shape)}, the model expects "
                f"{_show(spec.shape)} (samples on the first axis)"
            )
        result[spec.name] = array
    counts = {len(a) for a in result.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) > 1:
        raise DataError(f"{path}: arrays hold different numbers of samples: {sorted(counts)}")
    return Dataset(arrays=result, labels=labels, synthetic=False, description=str(path))


def batches(dataset: Dataset, specs: Sequence[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of at most ``MAX_BATCH`` samples (exactly the model's batch when it is fixed)."""
    if dataset.synthetic:
        # Synthetic arrays carry a leading axis of one "sample" holding the whole feed.
        yield {name: array[0] for name, array in dataset.arrays.items()}
        return
    fixed = [
        s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
    ]
    step = fixed[0] if fixed else MAX_BATCH
    for start in range(0, dataset.num_samples, step):
        yield {name: array[start : start + step] for name, array in dataset.arrays.items()}
