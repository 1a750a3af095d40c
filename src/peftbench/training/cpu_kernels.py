"""Compiled one-pass kernels for the CPU bf16 path (``cpu_kernels.c``), called with ctypes.

Under bf16 autocast on a CPU the element-wise work around the matmuls runs at memory speed:
a Llama-style MLP's ``act_fn(gate) * up`` is two eager passes forward and four backward, and
the RMSNorm over the float32 residual stream half a dozen each way. ``cpu_kernels.c`` does
each in one pass, widening to float32 and computing in registers. The SiLU gate's forward
rounds ``silu(gate)`` to bf16 before the product, as eager does (rounding the product only
once moved SmolLM2's step-1 prompt-tuning gradient from 2.7 % to 6.2 % off fp32's); the
gradients and the norm are rounded once. The LoRA layers' adapter work
(:mod:`~peftbench.training.lora_kernel`) and the rotary position embedding
(:mod:`~peftbench.training.fused_rotary`) are compiled passes of the same file. It is
compiled at first use (:mod:`~peftbench.training.compiled_c`); :func:`available` is False
without a compiler or with the environment variable ``PEFTBENCH_CPU_KERNELS=0``, and the
callers then keep PyTorch's operations.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from peftbench.training.compiled_c import load

_SOURCE = Path(__file__).with_suffix(".c")
_BF16, _F32 = torch.bfloat16, torch.float32

#: switched off by tests and benchmarks/ablation.py (``rms_norm_kernel``) to compare the
#: RMSNorm with PyTorch's operations; read at every call
rms_norm_enabled = True


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """``library`` (a build of ``cpu_kernels.c``) with its functions' signatures set."""
    p, size, count, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    library.pb_silu_mul.argtypes = [p, p, p, size, count]
    library.pb_silu_mul_backward.argtypes = [p, p, p, p, p, size, count]
    library.pb_rms_norm.argtypes = [p, p, p, p, size, size, real, count]
    library.pb_rms_norm_backward.argtypes = [p, p, p, p, p, size, size, p, count]
    library.pb_rotary.argtypes = [p, size, size, size, p, size, size, size, p, p, size,
                                  size, size, size, size, size, count, count]
    seed, threshold = ctypes.c_uint64, ctypes.c_uint32
    library.pb_lora_mask.argtypes = [p, size, size, seed, threshold]
    library.pb_lora_down.argtypes = [p, p, p, size, size, size, seed, threshold, p, p,
                                     count]
    library.pb_has_dpbf16.restype = ctypes.c_int
    library.pb_lora_max_rank.restype = ctypes.c_int
    library.pb_lora_up_add.argtypes = [p, p, p, real, size, size, size, p, count]
    library.pb_lora_grad_hidden.argtypes = [p, p, real, p, p, p, size, size, size, p, count]
    library.pb_lora_grad_input.argtypes = [p, p, p, p, p, count, p, size, size, size, seed,
                                           threshold, p, p, count]
    if library.pb_has_dpbf16():
        library.pb_attention_probs.argtypes = [p, p, p, size, size, size, size, size, size,
                                               real, p, p, count]
        library.pb_attention_grads.argtypes = [p, p, p, p, p, size, size, size, size, size,
                                               size, real, p, p, p, count]
        library.pb_attention_work.argtypes = [size, size]
        library.pb_attention_work.restype = size
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels with their signatures, or None (no compiler, or switched off
    with ``PEFTBENCH_CPU_KERNELS=0``); decided once per process."""
    if os.environ.get("PEFTBENCH_CPU_KERNELS", "1") == "0":
        return None
    library = load(_SOURCE)
    return None if library is None else declare(library)


def available() -> bool:
    """Whether the kernels are compiled (they compile at the first call of this) and not
    switched off with ``PEFTBENCH_CPU_KERNELS=0``."""
    return _library() is not None


def running(routed: int, switched_on: bool) -> int:
    """How many of ``routed`` modules run a compiled kernel: all when the kernels are compiled
    and its switch is on, else none. For the run record."""
    return routed if switched_on and available() else 0


def bf16_dot() -> bool:
    """Whether the kernels are compiled with AVX-512 BF16 dot products (``vdpbf16ps``): the
    LoRA kernels use them (else float32 multiply-adds of the same bf16 operands), and the
    attention kernels (``pb_attention_*``) exist only then."""
    return available() and _compiled_with_dpbf16()


@functools.cache
def _compiled_with_dpbf16() -> bool:
    """The build's answer, asked once (every attention layer asks twice a step)."""
    return bool(compiled().pb_has_dpbf16())


def lora_max_rank() -> int:
    """The largest LoRA rank the compiled LoRA kernels take (their per-rank arrays have a
    fixed size, so that the compiler keeps them in registers); 0 when not compiled."""
    return _compiled_max_rank() if available() else 0


@functools.cache
def _compiled_max_rank() -> int:
    return int(compiled().pb_lora_max_rank())


def compiled() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("peftbench's CPU kernels are not compiled; check available() first")
    return library


def _fits(tensor: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> bool:
    return (tensor.dtype == dtype and tensor.device.type == "cpu" and tensor.is_contiguous()
            and tensor.shape == shape)


def _pointers(expected: list[tuple[torch.Tensor, torch.dtype]],
              shape: torch.Size) -> list[int]:
    if not all(_fits(t, dtype, shape) for t, dtype in expected):
        got = ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}"
                        f"{'' if t.is_contiguous() else ' (not contiguous)'}"
                        for t, _ in expected)
        want = ", ".join(str(dtype) for _, dtype in expected)
        raise ValueError(f"expected contiguous CPU tensors of shape {tuple(shape)} and dtypes "
                         f"{want}; got {got}")
    return [t.data_ptr() for t, _ in expected]


def gate_accepts(*tensors: torch.Tensor) -> bool:
    """Whether the SiLU gate kernel takes these: contiguous bf16 on the CPU, one shape."""
    return all(_fits(t, _BF16, tensors[0].shape) for t in tensors)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (bf16) in one pass."""
    out = torch.empty_like(gate)
    compiled().pb_silu_mul(*_pointers([(gate, _BF16), (up, _BF16), (out, _BF16)], gate.shape),
                            gate.numel(), torch.get_num_threads())
    return out


def silu_mul_backward(grad: torch.Tensor, gate: torch.Tensor,
                      up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``silu(gate) * up`` with respect to ``gate`` and ``up`` (bf16), given
    the gradient ``grad`` of the product, in one pass."""
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    tensors = [(grad, _BF16), (gate, _BF16), (up, _BF16), (grad_gate, _BF16), (grad_up, _BF16)]
    compiled().pb_silu_mul_backward(*_pointers(tensors, gate.shape), gate.numel(),
                                     torch.get_num_threads())
    return grad_gate, grad_up


def norm_accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the RMSNorm kernel takes these: ``x`` contiguous float32 on the CPU, and a
    CPU weight (any float dtype) of its last dimension's size."""
    return (rms_norm_enabled and x.dim() >= 1 and _fits(x, _F32, x.shape)
            and weight.device.type == "cpu" and weight.shape == x.shape[-1:])


def rms_norm(x: torch.Tensor, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``bf16(weight * x / sqrt(mean(x^2, -1) + eps))`` and the per-row scale (float32,
    shape ``x.shape[:-1] + (1,)``) for ``x`` float32, in one pass."""
    out = torch.empty(x.shape, dtype=_BF16)
    scale = torch.empty((*x.shape[:-1], 1), dtype=_F32)
    weight = weight.detach().to(_F32).contiguous()
    cols = x.shape[-1]
    pointers = _pointers([(x, _F32), (out, _BF16)], x.shape)
    compiled().pb_rms_norm(pointers[0], weight.data_ptr(), pointers[1], scale.data_ptr(),
                            x.numel() // max(cols, 1), cols, eps, torch.get_num_threads())
    return out, scale


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`rms_norm`'s output with respect to ``x`` (float32), given its
    gradient ``grad`` (bf16) and the forward's ``scale``, in one pass."""
    grad_x = torch.empty(x.shape, dtype=_F32)
    weight = weight.detach().to(_F32).contiguous()
    cols, threads = x.shape[-1], torch.get_num_threads()
    rows = x.numel() // max(cols, 1)
    pointers = _pointers([(grad, _BF16), (x, _F32), (grad_x, _F32)], x.shape)
    if scale.dtype != _F32 or not scale.is_contiguous() or scale.numel() != rows:
        raise ValueError(f"scale must be the forward's contiguous float32 row scales ({rows})")
    work = torch.empty(threads * cols, dtype=_F32)
    compiled().pb_rms_norm_backward(pointers[0], pointers[1], weight.data_ptr(),
                                     scale.data_ptr(), pointers[2], rows, cols,
                                     work.data_ptr(), threads)
    return grad_x
