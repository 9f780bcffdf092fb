"""Shared fixtures: the bundled digits model and an in-process CLI runner."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from models import digits
from onnx_shrink import cli


@dataclasses.dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """Run ``onnx-shrink`` in-process and capture its exit code and output."""

    def run(*args: str | os.PathLike) -> CliRun:
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    """A private copy of the bundled digits model in a fresh folder."""
    target = tmp_path / "digits.onnx"
    target.write_bytes(digits.MODEL_PATH.read_bytes())
    return target
