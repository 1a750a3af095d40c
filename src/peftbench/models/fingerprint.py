"""Fingerprints of model weights: sha256 over a checkpoint directory's weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from peftbench.archives import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin"})

_memo: dict[tuple, str] = {}


def weight_files(folder: Path) -> list[Path]:
    """The weight files (``*.safetensors``, ``*.bin``) directly in ``folder``, sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix in WEIGHT_SUFFIXES and p.name not in NOT_WEIGHTS and p.is_file()
    )


def combine(hashes: dict[str, str]) -> str:
    """One sha256 over ``{file name: file sha256}`` (order-independent)."""
    lines = "".join(f"{name}\0{digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def dir_fingerprint(folder: Path) -> str:
    """sha256 over the weight files of a checkpoint directory, memoised in memory.

    The memo key includes each file's size and modification time, so a rewritten checkpoint
    is hashed again. Symlinks (as in the Hugging Face cache) are followed.
    """
    files = weight_files(folder)
    key = (str(folder.resolve()),
           tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _memo:
        _memo[key] = combine({p.name: sha256_file(p) for p in files})
    return _memo[key]
