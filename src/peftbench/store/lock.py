"""One ``peftbench run`` per results database at a time.

A run holds an OS advisory lock (``flock``) on a file beside the database (``DB.lock``,
naming its process) for as long as it runs; a second run on the same database is refused at
once. The OS drops the lock when the process ends, however it ends, so a lock file left
behind by a killed run does not block the next one. Reading commands (and ``run --dry-run``)
never look at it: the database stays readable while a run writes to it.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from peftbench.errors import UsageError


def lock_path(db: str | Path) -> Path:
    """The lock file of the database ``db``: ``db`` + ``.lock``."""
    db = Path(db)
    return db.with_name(db.name + ".lock")


class RunLock:
    """The run lock on ``db``: a context manager (or :meth:`acquire` / :meth:`release`)."""

    def __init__(self, db: str | Path) -> None:
        self.db = Path(db)
        self.path = lock_path(self.db)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise a :class:`UsageError` naming the run that holds it."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(self._in_use_message()) from None
            if _is_current(fd, self.path):
                break
            os.close(fd)  # released and removed between our open and flock: try again
        self._fd = fd
        owner = {"pid": os.getpid(), "started": datetime.now().astimezone().isoformat()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner).encode())

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        try:
            # not inherited by the processes a run starts (Python opens with O_CLOEXEC)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"--db {self.db}: cannot create its lock file {self.path} "
                             f"({exc.strerror}); give a --db in a folder you can write."
                             ) from None

    def _in_use_message(self) -> str:
        owner = _read_owner(self.path)
        who = (f"pid {owner['pid']}, started {_clock(owner['started'])}" if owner
               else f"see {self.path}")
        return (f"--db {self.db} is in use by another `peftbench run` ({who}); wait for it "
                "to finish or give another --db.")


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing run removes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The ``{"pid", "started"}`` a lock holder wrote, or None (not written yet)."""
    try:
        owner = json.loads(path.read_text())
        datetime.fromisoformat(owner["started"])
        return owner if isinstance(owner["pid"], int) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clock(iso: str) -> str:
    """``HH:MM`` local time, with the date when it is not today."""
    when = datetime.fromisoformat(iso).astimezone()
    today = when.date() == datetime.now().astimezone().date()
    return when.strftime("%H:%M" if today else "%Y-%m-%d %H:%M")
