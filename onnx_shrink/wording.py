"""Small helpers for the words of user-facing text."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one: "1 sample", "450 samples"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
