"""``fold.freeze``: graph inputs held at one value, so that fold specializes the graph to it.

Silero VAD computes its whole network inside an If on the sample rate ``sr``: calibration
does not reach a body, so ``quant`` left its Convs float. With ``sr`` frozen at 16000 the If
folds to its 16 kHz branch in the main graph, and quant calibrates it like any other.

Contract: ``parse(items)`` reads ``NAME=VALUE`` items (raising ``ShrinkError`` on a bad
one); ``freeze(model, values)`` makes each named graph input an initializer holding its
value (a scalar, or that value in every element of an input of fixed dims), in place. The
input leaves the model's interface: a caller that feeds it gets onnxruntime's error rather
than a model that ignores what it was given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.errors import ShrinkError

logger = logging.getLogger(__name__)


def parse(items: Sequence[str]) -> dict[str, float]:
    """``{"sr": 16000.0}`` from ``("sr=16000",)``; ``true``/``false`` read as 1 and 0."""
    values: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, word = name.strip(), raw.strip().lower()
        try:
            value = {"true": 1.0, "false": 0.0}.get(word)
            value = float(word) if value is None else value
        except ValueError:
            value = None
        if not sep or not name or value is None or math.isnan(value):
            raise ShrinkError(
                f"fold.freeze: {item!r} is not NAME=VALUE with a number (e.g. sr=16000)"
            )
        if name in values:
            raise ShrinkError(f"fold.freeze: input {name!r} is given twice")
        values[name] = value
    return values


def check(model: ir.Model, values: Mapping[str, float]) -> None:
    """Raise what ``freeze`` would, leaving ``model`` as it is: a shrink checks before it
    reads any data (BERT's attention_mask [batch, 32] drew two warnings on its data's values
    before the error that it cannot be frozen)."""
    for name, number in values.items():
        _filled(_input(model, name), number)


def freeze(model: ir.Model, values: Mapping[str, float]) -> None:
    """Make each input named in ``values`` an initializer holding its value, in place.

    Raises:
        ShrinkError: a name that is no graph input, an input of unknown type or of dims
            not all fixed, or a value its type cannot hold exactly (2.5 for an int64).
    """
    for name, number in values.items():
        value = _input(model, name)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(_filled(value, number), name=name)
        if not value.is_initializer():
            model.graph.register_initializer(value)
        logger.info("fold: input %r frozen at %g: the model no longer takes it", name, number)


def _input(model: ir.Model, name: str) -> ir.Value:
    """The graph input ``name``, or a ``ShrinkError`` naming the inputs there are."""
    inputs = {value.name: value for value in model.graph.inputs}
    if name not in inputs:
        raise ShrinkError(
            f"fold.freeze: the model has no input {name!r} (its inputs: "
            f"{', '.join(str(n) for n in inputs)})"
        )
    return inputs[name]


def _filled(value: ir.Value, number: float) -> np.ndarray:
    """An array of ``value``'s type and fixed dims, every element ``number``."""
    if not isinstance(value.type, ir.TensorType) or value.dtype is None:
        raise ShrinkError(f"fold.freeze: input {value.name!r} is no tensor of a known type")
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise ShrinkError(
            f"fold.freeze: input {value.name!r} has dims {shape}: only an input of fixed "
            "dims can be frozen"
        )
    dtype = value.dtype.numpy()
    array = np.full(tuple(shape), number, dtype=dtype)
    if float(np.asarray(number, dtype=dtype)) != number:
        raise ShrinkError(
            f"fold.freeze: input {value.name!r} is {value.dtype.name}, which cannot hold {number:g}"
        )
    return array
