"""Data fingerprints: sha256 over source files (by name) or over generated content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from peftbench.tasks.base import Example


def files_fingerprint(contents: Mapping[str, bytes]) -> str:
    """sha256 over the files' names and bytes, in sorted name order (location-independent)."""
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(f"{name}\0{hashlib.sha256(contents[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def content_fingerprint(splits: Mapping[str, Sequence[Example]]) -> str:
    """sha256 over every example (input, target, label, references, group) of every split."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        for ex in splits[name]:
            row = [name, ex.input, ex.target, ex.label, list(ex.references), ex.group]
            digest.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
