"""LoRA dropout without a dropped copy of the input: sparse corrections in compiled C.

:mod:`~peftbench.training.fused_lora_bf16` draws LoRA's dropout as a sorted list of dropped
positions (:func:`~peftbench.training.dropout.drop_positions`). Zeroing them needs a copy
of the layer's input in the forward and again in the backward, and the masked input
gradient another pass over a tokens x features tensor. With ``p = 0.05`` (peftbench's
default) only one element in twenty is dropped, so this module computes with the undropped
input and then subtracts what the dropped elements contributed, reading only those
(``sparse_dropout.c``; for ``p`` from :data:`MAX_P` on, zeroing is faster):

- forward: ``hidden = x A^T`` minus ``x[i, j] A[:, j]`` per dropped ``(i, j)``;
- backward: ``grad_A`` minus ``grad_hidden[i] x[i, j]`` in column ``j``, and the input
  gradient minus ``grad_hidden[i] . A[:, j]`` at ``(i, j)``.

The C file is compiled once per source and compiler with the system's C compiler (``CC``,
else ``cc``) into peftbench's cache (``PEFTBENCH_CACHE``), and loaded with ctypes. Without
a compiler, or if compiling fails, :func:`available` is False and the fused layer zeroes a
copy as before; the run records which path it took.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from peftbench.paths import cache_dir

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_suffix(".c")
_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared")
_BF16 = torch.bfloat16

#: switched off by benchmarks/ablation.py to measure what the corrections are worth
enabled = True

#: dropout probabilities from this one on zero copies instead: one SmolLM2-sized layer
#: (650 x 576 -> 576, r 8) took, forward and backward, 1.91 ms corrected against 2.79 zeroed
#: at p = 0.05, 2.14 / 2.88 at 0.1, 3.26 / 3.27 at 0.2 and 3.90 / 3.70 at 0.3
MAX_P = 0.2


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _compiler_identity(compiler: list[str]) -> str:
    done = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def build_library(folder: Path | None = None) -> Path:
    """Compile ``sparse_dropout.c`` into ``folder`` (default: the cache) unless a build of
    this source by this compiler for this system and architecture is there; returns the
    shared library's path. Raises ``OSError`` / ``subprocess.SubprocessError`` when no
    compiler works."""
    compiler = _compiler()
    source = _SOURCE.read_bytes()
    identity = [*_FLAGS, _compiler_identity(compiler), platform.system(), platform.machine()]
    key = hashlib.sha256(source + "\n".join(identity).encode()).hexdigest()[:16]
    folder = folder or cache_dir("kernels")
    library = folder / f"sparse_dropout-{key}.so"
    if library.exists():
        return library
    # compiled under a temporary name and renamed: concurrent workers never load half a file
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        subprocess.run([*compiler, *_FLAGS, "-o", partial, str(_SOURCE)],
                       capture_output=True, text=True, timeout=300, check=True)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(build_library()))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        _log.warning("LoRA dropout corrections not compiled (%s); zeroing copies instead",
                     str(detail).strip()[:500])
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.pb_hidden_minus_dropped.argtypes = [pointer, pointer, pointer, pointer, size, size,
                                                size, pointer]
    library.pb_backward_minus_dropped.argtypes = [pointer, pointer, ctypes.c_int, pointer,
                                                  pointer, pointer, pointer, size, size, size,
                                                  size, pointer]
    library.pb_hidden_minus_dropped.restype = size
    library.pb_backward_minus_dropped.restype = size
    return library


def available() -> bool:
    """Whether the corrections are compiled and switched on."""
    return enabled and _library() is not None


def pays(p: float) -> bool:
    """Whether dropout with probability ``p`` should be applied by corrections: available,
    and ``p`` below :data:`MAX_P` (each dropped element costs more than a zeroed one)."""
    return 0.0 < p < MAX_P and available()


def _check(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    if tensor.dtype != dtype or tensor.shape != shape or not tensor.is_contiguous() \
            or tensor.device.type != "cpu":
        raise ValueError(f"expected a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
                         f"{'' if tensor.is_contiguous() else ', not contiguous'}")
    return tensor.data_ptr()


def _positions(positions: torch.Tensor, count: int) -> tuple[int, int]:
    """Pointer and length of flat positions (strictly increasing, as drop_positions draws
    them; the C code checks that before using each), the last checked to lie below
    ``count``: the C code reads and writes at them."""
    if positions.dtype != torch.int64 or positions.dim() != 1 or not positions.is_contiguous():
        raise ValueError("positions must be a contiguous 1-D int64 tensor")
    if positions.numel() and not 0 <= int(positions[-1]) < count:
        raise ValueError(f"positions must be sorted and in [0, {count})")
    return positions.data_ptr(), positions.numel()


#: rows of ``hidden`` and columns of ``grad_A`` computed again in float32 because their
#: dropped part outweighed what remained (an outlier dropped), since the process started
recomputed = 0


def _done(status: int) -> None:
    global recomputed
    if status < 0:
        raise ValueError("positions must be strictly increasing")
    recomputed += status


def hidden_minus_dropped(hidden: torch.Tensor, rows: torch.Tensor, lora_a: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """``hidden -= (rows at positions) @ lora_a^T`` in place and returned: turns
    ``rows @ lora_a.t()`` into the product with those positions zeroed (all bf16)."""
    (tokens, cols), r = rows.shape, lora_a.shape[0]
    scratch = torch.empty(cols * r + 2 * r, dtype=torch.float32)
    _done(_library().pb_hidden_minus_dropped(
        _check(hidden, _BF16, (tokens, r)), _check(rows, _BF16, (tokens, cols)),
        _check(lora_a, _BF16, (r, cols)), *_positions(positions, tokens * cols), cols, r,
        scratch.data_ptr()))
    return hidden


def backward_minus_dropped(grad_a: torch.Tensor | None, grad_x: torch.Tensor | None,
                           grad_hidden: torch.Tensor, rows: torch.Tensor,
                           lora_a: torch.Tensor, positions: torch.Tensor) -> None:
    """In place, each unless None: ``grad_a -= grad_hidden^T @ (rows at positions)``
    (float32; ``grad_hidden.t() @ rows`` becomes the gradient of ``A`` under dropout) and
    ``grad_x -= grad_hidden @ lora_a`` at ``positions`` only (bf16 or float32, tokens x
    features; removes the adapter's part where the input was dropped). Others bf16."""
    (tokens, cols), r = rows.shape, lora_a.shape[0]
    x_pointer = None
    if grad_x is not None:
        if grad_x.dtype not in (_BF16, torch.float32):
            raise ValueError(f"grad_x must be bf16 or float32, got {grad_x.dtype}")
        x_pointer = _check(grad_x, grad_x.dtype, (tokens, cols))
    a_pointer = None if grad_a is None else _check(grad_a, torch.float32, (r, cols))
    scratch = torch.empty(2 * cols * r + r, dtype=torch.float32)
    _done(_library().pb_backward_minus_dropped(
        a_pointer, x_pointer, grad_x is not None and grad_x.dtype == _BF16,
        _check(grad_hidden, _BF16, (tokens, r)), _check(rows, _BF16, (tokens, cols)),
        _check(lora_a, _BF16, (r, cols)), *_positions(positions, tokens * cols), tokens, cols,
        r, scratch.data_ptr()))
