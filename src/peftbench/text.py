"""Small wording helpers for what peftbench prints."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``count(1, "run")`` -> "1 run", ``count(3, "run")`` -> "3 runs"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def dotted(path: tuple[str | int, ...]) -> str:
    """A key path as written in messages: ``("defaults", "lr")`` -> "defaults.lr",
    ``("seeds", 0)`` -> "seeds[0]"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def subject(names: list[str], verb: str, verb_plural: str) -> str:
    """``subject(["a"], "names", "name")`` -> "'a' names"; two names take the plural verb."""
    return f"{', '.join(repr(n) for n in names)} {verb if len(names) == 1 else verb_plural}"
