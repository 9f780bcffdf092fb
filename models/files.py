"""Real files of this machine's Python installation, as magika's file-type classifier reads them.

Contract:
    * ``python_files(n, seed)`` returns ``n`` regular files of at least ``MIN_BYTES`` from the
      running interpreter's standard library folder (``sysconfig``'s ``stdlib``, less its
      ``site-packages``): Python
      sources, bytecode, shared libraries, zipped wheels, icons, grammars, makefiles...
      Drawn round robin over file suffixes, each suffix's files in a seeded order:
      deterministic for one installation. Rare suffixes are drawn whole, so two seeds share
      files: disjoint slices of one draw make disjoint sets.
    * ``calibration_split(drawn)`` parts a draw: every 5th file to calibrate, the others to
      evaluate; disjoint, and both spread over the suffixes the draw takes in turn.
    * ``magika_features(data)`` is magika 1.0's ``_extract_features_from_bytes`` for
      ``standard_v3_3`` (``BEG_SIZE`` = ``END_SIZE`` = 1024, ``BLOCK_SIZE`` 4096, padding
      token 256): the first ``BLOCK_SIZE`` bytes with leading whitespace stripped, their first
      ``BEG_SIZE``, padded after with 256; then the last ``BLOCK_SIZE`` with trailing
      whitespace stripped, their last ``END_SIZE``, padded before; ``[2048]`` int32.
    * ``features(paths)`` stacks the features of ``paths``: ``[len(paths), 2048]``, the
      model's ``bytes`` input.

Nothing here runs a model; numpy only.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np

BEG_SIZE = END_SIZE = 1024
BLOCK_SIZE = 4096
PADDING_TOKEN = 256
MIN_BYTES = 16
"""magika's ``min_file_size_for_dl``, doubled: smaller files it labels without the model"""
_INSTALLED = frozenset({"site-packages", "dist-packages"})
"""folders of packages installed later, which differ from machine to machine"""


def python_files(n: int, seed: int) -> list[Path]:
    """``n`` files of the standard library folder, a seeded draw (see the module's doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = _candidates(root)
    if len(candidates) < n:
        raise ValueError(f"{root} holds {len(candidates)} files of {MIN_BYTES}+ bytes, not {n}")
    # Round robin over file suffixes, each in a seeded order: bytecode is most of the folder
    # (three optimization levels of every module), and would be most of a plain draw.
    rng = np.random.default_rng(seed)
    by_suffix: dict[str, list[Path]] = {}
    for path in candidates:
        by_suffix.setdefault(path.suffix, []).append(path)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_suffix.values()]
    drawn: list[Path] = []
    while len(drawn) < n:
        for queue in queues:
            if queue and len(drawn) < n:
                drawn.append(queue.pop())
    return drawn


def calibration_split(drawn: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every 5th file of ``drawn`` (calibration) and the others (evaluation)."""
    return drawn[::5], [p for i, p in enumerate(drawn) if i % 5]


@functools.cache
def _candidates(root: Path) -> tuple[Path, ...]:
    """The files of ``root`` ``python_files`` draws from, sorted: listed once a process
    (walking the standard library takes most of a second)."""
    return tuple(
        sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and not p.is_symlink()
            and _INSTALLED.isdisjoint(p.relative_to(root).parts)
            and _size(p) >= MIN_BYTES
        )
    )


def magika_features(data: bytes) -> np.ndarray:
    beg = data[:BLOCK_SIZE].lstrip()[:BEG_SIZE]
    end = data[-BLOCK_SIZE:].rstrip()[-END_SIZE:]
    padded_beg = list(beg) + [PADDING_TOKEN] * (BEG_SIZE - len(beg))
    padded_end = [PADDING_TOKEN] * (END_SIZE - len(end)) + list(end)
    return np.array(padded_beg + padded_end, np.int32)


def features(paths: list[Path]) -> np.ndarray:
    return np.stack([magika_features(p.read_bytes()) for p in paths])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # unreadable: left out
        return 0
