"""The files ``pipeline.run(dump_dir=...)`` writes: each pass's result, and the candidate a
verifier rolled back beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.errors import ShrinkError


def dump_files(dump_dir: str | Path, passes: Sequence[ir.passes.PassBase]) -> list[Path]:
    """Every file ``run`` may write to ``dump_dir`` for ``passes``: each pass's result, its
    rolled-back candidate, and their external-data files; for refusing, before any work, a
    dump that would write over a file the run reads."""
    files = []
    for index, pass_ in enumerate(passes):
        target = target_path(dump_dir, index, pass_)
        for path in (target, rolled_back_path(target)):
            files += [path, io.external_data_path(path)]
    return files


def make_dump_dir(dump_dir: str | Path) -> None:
    """Create ``dump_dir`` (and its parents), or say why it cannot be."""
    try:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShrinkError(f"{dump_dir}: cannot create the dump folder ({e.strerror})") from e


def dump(
    dump_dir: Path,
    index: int,
    pass_: ir.passes.PassBase,
    model: ir.Model,
    rejected: ir.Model | None,
) -> str:
    """Save the model after pass ``index`` (and the candidate a verifier rolled back, to
    look at what broke the tolerances); the saved model's path."""
    target = target_path(dump_dir, index, pass_)
    path = str(io.save(model, target).path)
    if rejected is not None:
        io.save(rejected, rolled_back_path(target))
    return path


def target_path(dump_dir: str | Path, index: int, pass_: ir.passes.PassBase) -> Path:
    """Where pass ``index``'s result goes."""
    return Path(dump_dir) / f"{index + 1:02d}-{pass_.name}.onnx"


def rolled_back_path(target: Path) -> Path:
    return target.with_name(f"{target.stem}.rolled-back.onnx")
