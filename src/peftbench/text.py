"""Small wording helpers for what peftbench prints."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``count(1, "run")`` -> "1 run", ``count(3, "run")`` -> "3 runs"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
