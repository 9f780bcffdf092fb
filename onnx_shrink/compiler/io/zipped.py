"""Compressed size of a model's files: where pruning's zeros pay at rest (``bench``)."""

from __future__ import annotations

import zlib
from pathlib import Path

ZIP_EXACT_BYTES = 128 << 20
"""Up to this many bytes, ``zipped_size`` compresses everything; past it, a sample: zipping
a 0.6 GB encoder twice took half of its default check's minute."""
ZIP_SAMPLES = 32
ZIP_SAMPLE_BYTES = 1 << 20


def zipped_bytes(paths: list[Path], level: int = 1) -> int:
    """Size of the files' contents compressed as one zlib stream (read in 4 MiB chunks)."""
    compressor = zlib.compressobj(level)
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def zipped_size(source: list[Path] | bytes, level: int = 1) -> tuple[int, bool]:
    """(zlib-compressed size of the files' contents, or of the bytes; whether it is an
    estimate): exact up to ``ZIP_EXACT_BYTES``; past it, ``ZIP_SAMPLES`` evenly spaced
    pieces of ``ZIP_SAMPLE_BYTES`` are compressed and their ratio scaled to the whole (zlib
    looks back 32 KiB only, so a piece compresses as it would in the stream, near enough)."""
    if isinstance(source, bytes):
        total = len(source)
        if total <= ZIP_EXACT_BYTES:
            return len(zlib.compress(source, level)), False

        def read(offset: int, length: int) -> bytes:
            return source[offset : offset + length]
    else:
        sizes = [p.stat().st_size for p in source]
        total = sum(sizes)
        if total <= ZIP_EXACT_BYTES:
            return zipped_bytes(source, level), False

        def read(offset: int, length: int) -> bytes:
            return _read_across(source, sizes, offset, length)

    step = total // ZIP_SAMPLES
    pieces = [read(offset, ZIP_SAMPLE_BYTES) for offset in range(0, step * ZIP_SAMPLES, step)]
    packed = sum(len(zlib.compress(piece, level)) for piece in pieces)
    return round(total * packed / sum(map(len, pieces))), True


def _read_across(paths: list[Path], sizes: list[int], offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset`` of the files' contents taken end to end."""
    pieces = []
    for path, size in zip(paths, sizes, strict=True):
        if offset >= size:
            offset -= size
            continue
        with open(path, "rb") as handle:
            handle.seek(offset)
            pieces.append(handle.read(length - sum(map(len, pieces))))
        offset = 0
        if sum(map(len, pieces)) >= length:
            break
    return b"".join(pieces)
