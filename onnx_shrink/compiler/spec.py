"""Pipeline specs: pass names, ``--set`` options and recipe files, made into pass instances.

A spec is parsed and validated completely before any model is loaded, so a typo costs
nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import registry
from onnx_shrink.compiler.io import data_files
from onnx_shrink.compiler.options import coerce
from onnx_shrink.errors import PipelineSpecError, ShrinkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PassLike = str | ir.passes.PassBase


def parse_spec(
    passes: str | Sequence[PassLike] | None,
    sets: str | Iterable[str] = (),
    recipe: str | Path | None = None,
) -> tuple[ir.passes.PassBase, ...]:
    """Build the pass instances a spec describes.

    Args:
        passes: ``"fold,quant"``, a list of names and/or pass instances, or None to take the
            list from the recipe.
        sets: ``"pass.option=value"`` strings (one such string alone too); they override
            the recipe's options.
        recipe: a TOML file with ``passes = [...]`` and one ``[pass-name]`` table of options
            per pass.

    Raises:
        PipelineSpecError: unknown pass or option, wrong type, out-of-range value, bad recipe.
    """
    recipe_passes, options = _read_recipe(recipe) if recipe is not None else (None, {})
    if isinstance(sets, str):  # one assignment, not its characters
        sets = [sets]
    given = sets
    sets = [] if isinstance(given, Mapping) else list(given)
    if isinstance(given, Mapping) or not all(isinstance(item, str) for item in sets):
        raise PipelineSpecError(
            f"sets: expected a list of 'pass.option=value' strings, got {given!r}"
        )
    seen: set[tuple[str, str]] = set()
    for assignment in sets:
        pass_name, key, raw = _split_assignment(assignment)
        if (pass_name, key) in seen:  # the last would silently win (a list is not extended)
            raise PipelineSpecError(
                f"{pass_name}.{key} is set twice; give it once (a list as a,b,c)"
            )
        seen.add((pass_name, key))
        options.setdefault(pass_name, {})[key] = raw
    items = _as_list(passes) if passes is not None else recipe_passes
    if not items:
        raise PipelineSpecError("no passes given; use --passes NAME[,NAME...] or a recipe file")
    names_in_pipeline = {i for i in items if isinstance(i, str)}
    # --passes replaces a recipe's list, not its option tables: say so where that is why.
    replaced = (
        "; --passes replaces the recipe's passes"
        if passes is not None and recipe_passes is not None and list(recipe_passes) != items
        else ""
    )
    for pass_name in options:
        registry.pass_class(pass_name)  # an unknown name in --set or a recipe is an error too
        if pass_name not in names_in_pipeline:
            raise PipelineSpecError(
                f"options are given for pass '{pass_name}', which is not in the pipeline "
                f"({', '.join(map(str, items))}){replaced}"
            )
    return tuple(
        _instantiate(item, options.get(item, {})) if isinstance(item, str) else item
        for item in items
    )


def _as_list(passes: str | Sequence[PassLike]) -> list[PassLike]:
    if isinstance(passes, str):
        return [name.strip() for name in passes.split(",") if name.strip()]
    result = list(passes)
    for item in result:
        if not isinstance(item, (str, ir.passes.PassBase)):
            raise PipelineSpecError(f"a pass must be a name or a pass instance, got {item!r}")
    return result


def _split_assignment(assignment: str) -> tuple[str, str, str]:
    target, sep, raw = assignment.partition("=")
    pass_name, dot, key = target.strip().partition(".")
    if not sep or not dot or not pass_name or not key:
        raise PipelineSpecError(
            f"--set expects PASS.OPTION=VALUE (e.g. fold.max_growth_bytes=1024), got {assignment!r}"
        )
    return pass_name, key.strip(), raw.strip()


def _instantiate(name: str, raw_options: Mapping[str, Any]) -> ir.passes.PassBase:
    cls = registry.pass_class(name)
    values = {key.replace("-", "_"): coerce(cls, key, raw) for key, raw in raw_options.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise PipelineSpecError(f"pass '{name}': {e}") from e


def _read_recipe(path: str | Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    try:
        data = tomllib.loads(data_files.read_text(path))
    except ShrinkError as e:  # unreadable, or not UTF-8: a bad recipe all the same
        raise PipelineSpecError(str(e)) from e
    except tomllib.TOMLDecodeError as e:
        raise PipelineSpecError(f"{path}: not valid TOML ({e})") from e
    passes = data.pop("passes", None)
    if passes is not None and (
        not isinstance(passes, list) or not all(isinstance(p, str) for p in passes)
    ):
        raise PipelineSpecError(f"{path}: 'passes' must be a list of pass names")
    options: dict[str, dict[str, Any]] = {}
    for key, table in data.items():
        if not isinstance(table, dict):
            raise PipelineSpecError(
                f"{path}: unexpected top-level key '{key}'; a recipe holds 'passes' and one "
                f"table per pass ({', '.join(sorted(registry.REGISTRY))})"
            )
        options[key] = dict(table)
    return list(passes or []), options


def pass_name(pass_: ir.passes.PassBase) -> str:
    """A pass's CLI name (its class's name for a pass from outside the registry)."""
    return getattr(pass_, "name", type(pass_).__name__)


def describe(pass_: ir.passes.PassBase) -> str:
    """A pass as a spec: its name plus the options that differ from their defaults."""
    name = pass_name(pass_)
    if not dataclasses.is_dataclass(pass_):
        return name
    changed = [
        f"{f.name}={_option_text(getattr(pass_, f.name))}"
        for f in dataclasses.fields(pass_)
        if _differs(getattr(pass_, f.name), _default(f))
    ]
    return f"{name}({', '.join(changed)})" if changed else name


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _differs(value: Any, default: Any) -> bool:
    """Whether an option is not its default. A user's pass may hold an array, whose ``!=``
    is elementwise (and ambiguous as a truth value): it counts as changed unless equal."""
    try:
        return bool(value != default)
    except (TypeError, ValueError):
        try:
            return not np.array_equal(value, default)
        except (TypeError, ValueError):
            return True


def _option_text(value: Any) -> str:
    """An option's repr for a one-line spec: a value of Python's own types in full (an
    ``exclude`` list a search made), another (an array) by its type where its repr takes
    lines."""
    text = repr(value)
    if isinstance(value, (str, int, float, bool, tuple, list, dict, type(None))):
        return text
    return text if "\n" not in text else f"<{type(value).__name__}>"
