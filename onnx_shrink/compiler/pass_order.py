"""Pass orders in which a pass finds nothing left to do, said before any model is read.

A quantizing pass (``quant``, ``quant-dynamic``, ``quant-weight``) leaves the layers it
quantizes as integer codes; ``prune``, ``prune-channels`` and ``lowrank`` rewrite float
weights only, so after it they pass those layers by, and say so only once the calibration
they waited for is over ("no layer changed"). Pruning first is also the better order where
both could run: the quantizer then calibrates, and fits its scales to, the weights that ship.

Other orders are the passes' own to judge, as they run: a quantizer after ``fp16`` and
``lowrank`` after ``prune`` warn then, with what they found.

A pass class says which it is with a ClassVar: ``quantizes_weights`` (a quantizer) or
``rewrites_float_weights`` (a float rewriter); names are looked up in the registry, the one
place in the compiler that knows passes by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from onnx_shrink.compiler import spec
from onnx_shrink.compiler.registry import REGISTRY

logger = logging.getLogger(__name__)


def warn_order(passes: Sequence[ir.passes.PassBase]) -> str | None:
    """Warn once where a float rewriter comes after a quantizer, with the order that runs
    both; the warning's text, or None where the order is fine."""
    names = [spec.pass_name(p) for p in passes]
    late = names[_first_quantizer(names) :]
    rewriters = list(dict.fromkeys(n for n in late if _rewrites_float(n)))
    if not rewriters:
        return None
    quantizers = list(dict.fromkeys(n for n in names if _quantizes(n)))
    message = (
        f"{_listed(rewriters)} after {_listed(quantizers)} in the passes: the layers "
        f"{_listed(quantizers)} {_verb('quantize', quantizers)} hold integer codes, which "
        f"{_listed(rewriters)} {_verb('leave', rewriters)} as they are; the order "
        f"{','.join(reordered(names))} does both"
    )
    logger.warning(message)
    return message


def reordered(names: Sequence[str]) -> list[str]:
    """``names`` with every float rewriter that follows a quantizer moved just before the
    first quantizer, the rest in their order."""
    first = _first_quantizer(names)
    moved = [n for n in names[first:] if _rewrites_float(n)]
    rest = [n for n in names[first:] if not _rewrites_float(n)]
    return [*names[:first], *moved, *rest]


def _first_quantizer(names: Sequence[str]) -> int:
    """The index of the first quantizer in ``names``; ``len(names)`` where there is none."""
    return next((i for i, n in enumerate(names) if _quantizes(n)), len(names))


def _quantizes(name: str) -> bool:
    return bool(getattr(REGISTRY.get(name), "quantizes_weights", False))


def _rewrites_float(name: str) -> bool:
    return bool(getattr(REGISTRY.get(name), "rewrites_float_weights", False))


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def _verb(verb: str, subjects: Sequence[str]) -> str:
    return verb if len(subjects) > 1 else f"{verb}s"
