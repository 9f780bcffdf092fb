"""Pass options as dataclass fields: declaration, documentation, parsing and range checks.

A pass declares each option with ``option(default, doc, ...)``; from that one declaration the
CLI parses ``--set pass.option=value`` and recipe values, ``--list-passes`` prints the docs,
and ``check_options`` rejects out-of-range values in ``__post_init__``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
import typing
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnx_shrink.errors import PipelineSpecError

logger = logging.getLogger(__name__)


def option(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: Sequence[Any] | None = None,
    patterns: bool = False,
    infinite: bool = False,
) -> Any:
    """Declare a pass option: a dataclass field whose metadata carries its doc and bounds;
    ``patterns``: its items are node names or regular expressions, each checked to compile
    (one that names no node but tensors names their writers: ``tensor_patterns``);
    ``infinite``: a float option that may be ``inf`` (a time budget: no limit). NaN is never
    a value."""
    metadata = {"doc": doc, "minimum": minimum, "maximum": maximum, "choices": choices}
    metadata["patterns"] = patterns
    metadata["infinite"] = infinite
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable; use a tuple or frozenset")
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option as shown by ``--list-passes``."""

    name: str
    type_name: str
    default: Any
    doc: str
    choices: Sequence[Any] | None


def option_infos(pass_class: type) -> list[OptionInfo]:
    """The options of a pass class, in declaration order."""
    hints = typing.get_type_hints(pass_class)
    return [
        OptionInfo(
            name=f.name,
            type_name=_type_name(hints[f.name]) + _range(f.metadata),
            default=f.default,
            doc=f.metadata.get("doc", "") + (TENSOR_NAMES if f.metadata.get("patterns") else ""),
            choices=f.metadata.get("choices"),
        )
        for f in dataclasses.fields(pass_class)
    ]


TENSOR_NAMES = " (a tensor's name, as --layers shows, names the node that writes it)"
"""What ``--list-passes`` adds to a pattern option's doc (``tensor_patterns``)"""


def _range(metadata: typing.Mapping[str, Any]) -> str:
    """An option's bounds as ``--list-passes`` shows them after its type."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if low is not None and high is not None:
        return f" in [{low:g}, {high:g}]"
    if low is not None:
        return f" >= {low:g}"
    return f" <= {high:g}" if high is not None else ""


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def check_options(instance: Any) -> None:
    """Raise ``ValueError`` naming the option when a value is out of range or not a choice."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        lo, hi, choices = (
            f.metadata.get("minimum"),
            f.metadata.get("maximum"),
            f.metadata.get("choices"),
        )
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}")
        # Range checks are False for NaN; inf would pass a missing maximum (ridge=inf zeroes
        # every refit weight).
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{f.name}=nan is not a number")
        if isinstance(value, float) and math.isinf(value) and not f.metadata.get("infinite"):
            raise ValueError(f"{f.name}={value!r} must be finite")
        if lo is not None and value < lo:
            raise ValueError(f"{f.name}={value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{f.name}={value!r} is above the maximum {hi}")
        for pattern in value if f.metadata.get("patterns") else ():
            _check_pattern(f.name, pattern)


def _check_pattern(option_name: str, pattern: str) -> None:
    """A name-or-regex option's item must compile: a typo such as ``[`` would otherwise
    fail deep inside the pass, or quietly match nothing."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{option_name}: {pattern!r} is not a regular expression ({e}); to match a name "
            f"as written, escape it: {re.escape(pattern)}"
        ) from e


def pattern_names(pattern: str, name: str) -> bool:
    """An item of a pattern option (``option(patterns=True)``, checked to compile) names
    ``name``: equal to it, or a regular expression that fully matches it."""
    return pattern == name or re.fullmatch(pattern, name) is not None


def warn_unmatched(
    option_name: str,
    patterns: Sequence[str],
    names: Sequence[str],
    what: str = "node name",
    regex: bool = True,
) -> None:
    """Warn about each item of a name-or-regex option (``pass.option``) that names none of
    ``names`` (the model's, in graph order): a typo would otherwise run as if the option had
    not been given. ``regex`` off: the items are exact names (op types, ``quant.only``),
    matched as the pass matches them (``["CumSum"`` is then a typo, not a bad regex)."""
    present = [name for name in dict.fromkeys(names) if name]
    for pattern in patterns:
        if any(pattern_names(pattern, name) if regex else name == pattern for name in present):
            continue
        shown = ", ".join(repr(name) for name in present[:3])
        logger.warning(
            "%s: %r matches no %s of the model (%s%s), so it changes nothing",
            option_name,
            pattern,
            what,
            f"those look like {shown}" if present else "it has none",
            ", ..." if len(present) > 3 else "",
        )


def coerce(pass_class: type, name: str, raw: Any) -> Any:
    """Convert a CLI string or a recipe value to the option's declared type.

    Raises:
        PipelineSpecError: the option does not exist or the value has the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(pass_class)}
    key = name.replace("-", "_")
    if key not in fields:
        valid = ", ".join(fields) or "(none)"
        raise PipelineSpecError(
            f"pass '{pass_class.name}' has no option '{name}'; its options are: {valid}"
        )
    hint = typing.get_type_hints(pass_class)[key]
    try:
        return _convert(hint, raw)
    except (TypeError, ValueError) as e:
        raise PipelineSpecError(
            f"{pass_class.name}.{key}: expected {_type_name(hint)}, got {raw!r}"
        ) from e


def _convert(hint: Any, raw: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if raw not in allowed:
            raise ValueError(raw)
        return raw
    if origin is tuple:
        if not isinstance(raw, str | list | tuple):  # a TOML table would give its keys
            raise TypeError(raw)
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        item_type = typing.get_args(hint)[0]
        return tuple(
            _convert(item_type, item.strip() if isinstance(item, str) else item)
            for item in items
            if item != ""
        )
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        lowered = str(raw).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
    if hint is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise TypeError(raw)
        return raw
    raise TypeError(f"unsupported option type {hint}")


def warn_unmatched_exclusions(model: ir.Model, pass_name: str, exclude: Sequence[str]) -> None:
    """Warn about ``exclude`` patterns that name no node of ``model`` (subgraphs included)."""
    if exclude:
        names = [node.name or "" for node in ir.traversal.RecursiveGraphIterator(model.graph)]
        warn_unmatched(f"{pass_name}.exclude", exclude, names)


def warn_unmatched_op_types(model: ir.Model, option: str, asked: Sequence[str]) -> None:
    """Warn about op types in ``asked`` (option ``option``) that no node of ``model`` has
    (subgraphs included)."""
    if asked:
        op_types = [node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)]
        warn_unmatched(option, asked, op_types, "op type", regex=False)


def refuse_inapplicable(config: Any, applies: dict[str, bool], why: str) -> None:
    """Raise ``ValueError`` for an option set away from its default where it does not apply
    (``applies``: option name -> whether it applies with the others as set; ``why``: the
    reason, after the message): it would be silently ignored, and the run would not be what
    was asked."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, applicable in applies.items():
        if not applicable and getattr(config, name) != defaults[name]:
            raise ValueError(f"{name}={getattr(config, name)!r} does not apply here: {why}")


def warn_no_change(
    pass_name: str,
    what: str,
    reasons: Sequence[str],
    each: str = "-v",
    none: str | None = None,
    note: str = "",
) -> None:
    """One warning that ``pass_name`` changed nothing, with why, counted by reason, and the
    verbosity (``each``) at which the pass logs each one's own line: "no change" in the
    summary said nothing of it. ``none``: why, where there is no candidate and so no reason
    to count (not "...: 1"); ``note`` ("; ..."): what the model is, after either."""
    if not reasons and none is not None:
        logger.warning("%s: no %s changed (%s%s)", pass_name, what, none, note)
        return
    counts = collections.Counter(reason or "no reason given" for reason in reasons)
    why = "; ".join(f"{r}: {n}" for r, n in counts.most_common()) or "nothing it handles"
    logger.warning("%s: no %s changed (%s%s; %s for each)", pass_name, what, why, note, each)
