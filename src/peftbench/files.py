"""Writing result files: into usable folders, atomically, with the permissions the user's
umask gives."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from peftbench.errors import UsageError


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open`` or ``mkdir`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no such numbers (Python writes a
    bare ``NaN`` that other JSON readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON via a temporary file and a rename: readers never see half a
    file. Readable as the umask allows (a temporary file is the owner's only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(json_safe(data), handle, indent=2, default=str, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_folder(folder: Path, option: str, what: str = "folder",
                   create: bool = True) -> None:
    """A usage error naming ``option`` unless ``folder`` is (or, ``create``, can be made) a
    folder: checked before any work that would write there."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder}: is a file, not a folder; give a folder for "
                         "adapters and result.json")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{option} {folder}: cannot create the {what} "
                             f"({exc.strerror or exc}); give a writable folder") from None


def require_input_folder(folder: Path, option: str, what: str) -> None:
    """A usage error naming ``option`` unless ``folder`` is an existing folder (one to read
    from): a mistyped path is reported, not silently ignored by work that would not read
    it."""
    path = folder.expanduser()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "no such folder"
        raise UsageError(f"{option} {folder}: {state}; give the folder with {what}")
