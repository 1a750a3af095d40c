"""Device choice and mixed precision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from peftbench.errors import UsageError


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu "
                         "or --device auto.")
    return torch.device(choice)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """A no-argument factory of the autocast context for ``precision`` (bf16 or fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
