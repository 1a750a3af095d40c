"""Silence transformers' per-tensor "Loading weights" progress bar for local loads.

Loading a cached local checkpoint takes well under a second; a progress bar for it is
noise in every run's output. Downloads (Hub ids) keep their progress bars.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging


@contextmanager
def no_weight_progress() -> Iterator[None]:
    """Disable transformers' progress bars inside the block; restore the previous state."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
