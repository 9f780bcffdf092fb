"""Small helpers for the words of user-facing text."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one: "1 sample", "450 samples"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def human_bytes(n: float) -> str:
    """Binary units, named as such (the HTML report's plots use decimal kB/MB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
