"""Device choice and mixed precision: ``auto`` picks bf16 only where it is fast."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftbench.errors import UsageError


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu "
                         "or --device auto.")
    return torch.device(choice)


def has_fast_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run on hardware made for them.

    CUDA: native bf16 (compute capability 8.0 and newer; torch's default check also counts
    the emulation of older GPUs). CPU: AVX-512 BF16 or AMX instructions.
    Without them oneDNN emulates bf16: measured on an AVX2-only AMD EPYC (Zen 3), a
    512 x 512 bf16 matmul ran at 1.3 GFLOP/s against 131 GFLOP/s in fp32, so bf16 training
    there would be about 100x slower, not faster.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`has_fast_bf16`, else ``fp32``; others as given."""
    if choice == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    if choice not in ("bf16", "fp32"):
        raise UsageError(f"precision {choice!r}: use auto, bf16 or fp32.")
    return choice


def slow_bf16_warning(choice: str, device: torch.device) -> str | None:
    """A warning when bf16 was asked for explicitly on hardware that only emulates it."""
    if choice != "bf16" or has_fast_bf16(device):
        return None
    where = "this CPU has no AVX-512 BF16 or AMX" if device.type == "cpu" else \
        f"{device} does not support bf16"
    return (f"precision bf16: {where}, so bf16 matrix products are emulated (about 100x "
            "slower than fp32 on an AVX2 CPU); --precision auto picks fp32 here.")


@contextlib.contextmanager
def _cpu_bf16_autocast() -> Iterator[None]:
    """bf16 autocast on CPU, attention on the math SDPA kernel.

    On CPU the fused ("flash") SDPA kernel is slow in bf16 for the short sequences of
    fine-tuning: measured forward + backward at batch 16 x 9 heads x 50 tokens x 64 with a
    padding mask, 21 ms against 9 ms for the math kernel (the same accuracy against an
    fp64 reference), which was ~20 % of a SmolLM2 LoRA step. Autograd records the kernel
    chosen in the forward, so the backward follows.
    """
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16), \
            sdpa_kernel([SDPBackend.MATH]):
        yield


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """A no-argument factory of the autocast context for ``precision`` (bf16 or fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cpu":
        return _cpu_bf16_autocast
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
