"""A LoRA layer's adapter products as compiled passes (``cpu_kernels.c``), for CPU bf16.

In an all-linear LoRA step on SmolLM2 (2 cores, batch 16), the adapters' rank-8 matmuls
ran at 20-100 GFLOP/s: with one side 8 wide, oneDNN's products are memory bound. Their 1048
calls took 120 ms per step and the ``addmm_`` adding the adapter's output 22 ms, against
397 ms for all frozen matmuls; drawing and applying the dropout positions took another
55 ms (``benchmarks/README.md``). :class:`_LoraLinearKernel` computes the same layer as
:class:`~peftbench.training.fused_lora_bf16._LoraLinearBf16` with the frozen matmuls left
to torch and everything else in four passes over memory:

- forward: ``hidden = dropout(x) A^T`` from the bf16 input, then the adapter's output
  ``hidden (scale B)^T`` added into the base product in place;
- backward: one pass over the output gradient gives ``grad_hidden`` and ``B``'s gradient;
  one pass over the input gives ``A``'s
  gradient and adds the adapter's part to the base input gradient.

Dropout is drawn inside the kernels from a hash of each element's index and a seed taken
from torch's default generator (so ``torch.manual_seed`` fixes it). The AVX-512 BF16
kernels keep it for the backward as a bit per element (1/16 of the bf16 input); the
portable ones draw it again. Every element is dropped independently with probability
``p`` (to 2^-32) as in ``nn.Dropout``; the masks are other draws than torch's, and than
:mod:`~peftbench.training.dropout`'s positions used where the kernels are not compiled.
The adapter computes in bf16 as under autocast: ``A``, ``B``, ``hidden`` and
``grad_hidden`` are rounded to bf16 and their products summed in float32 (the PyTorch
fallback, :class:`~peftbench.training.fused_lora_bf16._LoraLinearBf16`, rounds ``scale B``
and the gradient products' results as well), with AVX-512 BF16
dot products (``vdpbf16ps``, twice the float32 multiply-adds' rate) where the CPU has them
(:func:`~peftbench.training.cpu_kernels.bf16_dot`). ``A``'s and ``B``'s gradients are
float32; their partial sums are added per thread, so their last bits depend on the thread
count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from peftbench.training import cpu_kernels
from peftbench.training.fused_lora_bf16 import shared_bf16_copy

_BF16, _F32 = torch.bfloat16, torch.float32

#: switched off by tests and benchmarks/ablation.py (``lora_kernel``) to compare with
#: PyTorch's operations; read at every call
enabled = True


def dropout_threshold(p: float) -> int:
    """The kernels' dropout threshold for probability ``p`` (0 <= p < 1): an element is
    dropped when its 32-bit hash is below it."""
    return int(p * 2**32) if p > 0.0 else 0


def accepts(x: torch.Tensor, weight: torch.Tensor, p: float, rank: int) -> bool:
    """Whether the kernels take this layer: compiled and enabled, a CPU input in float32 or
    bf16, a bf16 frozen weight, 0 <= p < 1, flat indices within 32 bits, and a LoRA rank
    of at most :func:`~peftbench.training.cpu_kernels.lora_max_rank` (64)."""
    return (enabled and x.device.type == "cpu" and x.dtype in (_F32, _BF16)
            and weight.dtype == _BF16 and 0.0 <= p < 1.0 and x.numel() < 2**32
            and takes_rank(rank))


def takes_rank(rank: int) -> bool:
    """Whether the compiled kernels take a LoRA rank: 1 to
    :func:`~peftbench.training.cpu_kernels.lora_max_rank` (0 without the kernels)."""
    return 1 <= rank <= cpu_kernels.lora_max_rank()


def dropout_mask(rows: int, cols: int, seed: int, p: float) -> torch.Tensor:
    """The kernels' dropout mask for a ``rows x cols`` input and ``seed`` (True: kept)."""
    keep = torch.empty(rows, cols, dtype=torch.uint8)
    cpu_kernels.compiled().pb_lora_mask(keep.data_ptr(), rows, cols, seed,
                                        dropout_threshold(p))
    return keep.bool()


def draw_seed() -> int:
    """A 62-bit dropout seed from torch's default generator."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


class _LoraLinearKernel(torch.autograd.Function):
    """``x W^T (+ bias) + scaling * dropout(x) A^T B^T``, bf16 output; only A and B are
    trained (and the bias, if it requires a gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                p: float) -> torch.Tensor:
        library, threads = cpu_kernels.compiled(), torch.get_num_threads()
        rows = shared_bf16_copy(x).reshape(-1, x.shape[-1]).contiguous()
        (m, k), n, r = rows.shape, weight.shape[0], lora_a.shape[0]
        if not takes_rank(r):
            raise ValueError(f"LoRA rank {r} is outside the compiled kernels' 1.."
                             f"{cpu_kernels.lora_max_rank()}; check accepts() first")
        threshold = dropout_threshold(p)
        seed = draw_seed() if threshold else 0
        scale = scaling / (1.0 - p)
        a, b = _float32(lora_a), _float32(lora_b)
        hidden = torch.empty(m, r, dtype=_F32)  # bf16 values
        work = torch.empty(r * max(n, k), dtype=_F32)  # held here: the kernels write into it
        # the dropout mask, a bit per element, for the backward (only the AVX-512 BF16
        # kernels keep it; the portable ones draw it again)
        keep_bits = threshold != 0 and cpu_kernels.bf16_dot()
        bits = torch.empty(m, (k + 31) // 32 if keep_bits else 0, dtype=torch.int32)
        library.pb_lora_down(rows.data_ptr(), a.data_ptr(), hidden.data_ptr(), m, k, r, seed,
                             threshold, bits.data_ptr() if keep_bits else None,
                             work.data_ptr(), threads)
        out = (rows @ weight.t() if bias is None
               else torch.addmm(bias.detach().to(_BF16), rows, weight.t()))
        library.pb_lora_up_add(out.data_ptr(), hidden.data_ptr(), b.data_ptr(), scale, m, n, r,
                               work.data_ptr(), threads)
        ctx.save_for_backward(rows, weight, a, b, hidden, bits)
        ctx.seed, ctx.threshold, ctx.scale = seed, threshold, scale
        ctx.x_dtype, ctx.bias_dtype = x.dtype, getattr(bias, "dtype", None)
        return out.view(*x.shape[:-1], n)

    @staticmethod
    @once_differentiable  # the kernels write outside autograd: no graph of the backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        library, threads = cpu_kernels.compiled(), torch.get_num_threads()
        rows, weight, a, b, hidden, bits = ctx.saved_tensors
        (m, k), n, r = rows.shape, weight.shape[0], a.shape[0]
        # autograd hands a bf16 output a bf16 gradient; anything else is rounded to it
        g = grad.reshape(m, n).to(_BF16).contiguous()
        grad_hidden = torch.empty(m, r, dtype=_F32)
        grad_b = torch.empty(n, r, dtype=_F32)
        # held here: the kernels write into it
        work = torch.empty(r * max(n, k) * (1 + threads), dtype=_F32)
        library.pb_lora_grad_hidden(g.data_ptr(), b.data_ptr(), ctx.scale, hidden.data_ptr(),
                                    grad_hidden.data_ptr(), grad_b.data_ptr(), m, n, r,
                                    work.data_ptr(), threads)
        grad_x = gx_base = None
        if ctx.needs_input_grad[0]:
            gx_base = g @ weight
            grad_x = gx_base if ctx.x_dtype == _BF16 else torch.empty(m, k, dtype=_F32)
        grad_a = torch.empty(r, k, dtype=_F32)
        library.pb_lora_grad_input(None if gx_base is None else gx_base.data_ptr(),
                                   grad_hidden.data_ptr(), a.data_ptr(), rows.data_ptr(),
                                   None if grad_x is None else grad_x.data_ptr(),
                                   int(ctx.x_dtype == _F32), grad_a.data_ptr(), m, k, r,
                                   ctx.seed, ctx.threshold,
                                   bits.data_ptr() if bits.numel() else None,
                                   work.data_ptr(), threads)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], k)
        grad_bias = (g.sum(0, dtype=_F32).to(ctx.bias_dtype) if ctx.needs_input_grad[2]
                     else None)
        return (grad_x, None, grad_bias, grad_a if ctx.needs_input_grad[3] else None,
                grad_b if ctx.needs_input_grad[4] else None, None, None)


def _float32(parameter: torch.Tensor) -> torch.Tensor:
    """A LoRA matrix as the kernels read it: float32, contiguous (itself when it is)."""
    return parameter.detach().to(_F32).contiguous()


def lora_linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                       p: float) -> torch.Tensor:
    """The adapted layer's output in bf16 through the compiled kernels (check
    :func:`accepts` first; ``p``: the dropout probability, 0 when off)."""
    return _LoraLinearKernel.apply(x, weight, bias, lora_a, lora_b, scaling, p)
