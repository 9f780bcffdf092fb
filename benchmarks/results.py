"""The shared parts of benchmark scripts: the machine line and writing RESULTS.md sections."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """``Linux x86_64, <CPU model>, N cores``: the line every results section starts with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section under ``heading`` in ``path`` (or append it), keeping the rest."""
    # Imported here: quant_vs_ort's measured children import this module, and nothing else of
    # onnx-shrink before their baseline.
    from onnx_shrink.compiler.io import data_files

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    data_files.write_text(path, new)


def publish(heading: str, text: str, write: bool = True) -> None:
    """Print a benchmark's section and, with ``write``, replace it in RESULTS.md."""
    print(text)
    if write:
        write_section(heading, text)
        print(f"wrote {RESULTS}", file=sys.stderr)


def package_version(dist: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How a run was started, as its section's "Command:" line shows it: ``.venv/bin/python
    SCRIPT ARGS`` (``script``: a path, or ``-m MODULE``), the arguments shell-quoted;
    ``argv`` None: this process's."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", script, *map(shlex.quote, args)])


def provenance(command: str, packages: tuple[str, ...]) -> list[str]:
    """The lines every results section starts with: command, date, machine, versions."""
    versions = ", ".join(f"{d} {package_version(d)}" for d in packages)
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"Command: `{command}`  ",
        f"Date: {when}  ",
        f"Machine: {machine()}; Python {platform.python_version()}  ",
        f"Versions: {versions}",
    ]


def first_line(error: BaseException, limit: int = 200) -> str:
    """The error's message on one line (newlines collapsed), cut to fit a table cell."""
    text = " ".join(str(error).split()).replace("|", "/")
    return f"{type(error).__name__}: {text[:limit]}"


def cell(value: object, spec: str = "") -> str:
    """``value`` formatted for a table cell; "—" for a missing one."""
    return "—" if value is None else format(value, spec)
