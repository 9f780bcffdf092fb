"""Shared fixtures: the bundled digits model and an in-process CLI runner."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from models import digits
from onnx_shrink import cli, warning_records

# CI explores the same examples every run (a red build must reproduce); locally hypothesis
# keeps searching new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclasses.dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def fresh_warn_once() -> None:
    """Each test is a run of its own for ``warn_once``, in whatever order they run."""
    warning_records.forget_said()


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """Run ``onnx-shrink`` in-process and capture its exit code and output."""

    def run(*args: str | os.PathLike) -> CliRun:
        # The CLI configures logging globally, as a program should; restore it afterwards so
        # later tests' caplog still sees the library's INFO records.
        root, ours = logging.getLogger(), logging.getLogger("onnx_shrink")
        saved = (list(root.handlers), root.level, ours.level)
        try:
            code = cli.main([str(a) for a in args])
        finally:
            root.handlers[:], root.level = saved[0], saved[1]
            ours.setLevel(saved[2])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    """A private copy of the bundled digits model in a fresh folder."""
    target = tmp_path / "digits.onnx"
    target.write_bytes(digits.MODEL_PATH.read_bytes())
    return target
