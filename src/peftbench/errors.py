"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""

from __future__ import annotations


class PeftbenchError(Exception):
    """A problem the user can fix: bad argument, missing file, malformed data.

    The message must say what was wrong, where (file:line, argument or config key) and
    what would be right.
    """

    exit_code = 2


class UsageError(PeftbenchError):
    """An unknown name or a bad value given on the command line or in a config file."""


class DataError(PeftbenchError):
    """A data file that is missing, unreadable or malformed."""


class ArchiveError(PeftbenchError):
    """A pinned package archive that cannot be fetched or does not match its hash."""


class CrashError(PeftbenchError):
    """A helper process died (killed, out of memory): not the user's mistake, exit 1."""

    exit_code = 1


def did_you_mean(name: str, choices: list[str]) -> str:
    """A short hint naming the valid choices, closest first."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Choose one of: {', '.join(sorted(choices))}."
