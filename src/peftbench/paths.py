"""Where peftbench keeps its caches (converted weights, fetched archives, tokenised data)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """The cache root (``PEFTBENCH_CACHE`` or the user's cache dir), joined with ``parts``."""
    root = os.environ.get("PEFTBENCH_CACHE") or platformdirs.user_cache_dir("peftbench")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
