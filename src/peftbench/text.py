"""Small wording helpers for what peftbench prints."""

from __future__ import annotations

from typing import Any

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # suite and task names: file-name safe
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_PATTERN_WORDS = {
    NAME_PATTERN: "ASCII letters, digits, '_', '.' and '-' only, starting with a letter "
                  "or a digit (no spaces), e.g. news-v2",
    SHA256_PATTERN: "64 lowercase hexadecimal digits (a sha256)",
}


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


def validation_message(error: Any) -> str:
    """A pydantic error's message in words: a pattern we set is described, not quoted as a
    regular expression; pydantic's "Value error, " prefix is dropped."""
    if error.get("type") == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get((error.get("ctx") or {}).get("pattern"))
        if words:
            return f"use {words}"
    return str(error["msg"]).removeprefix("Value error, ")
