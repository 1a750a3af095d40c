"""LoRA layers as one autograd function under bf16 autocast, for CPUs with bf16 units.

Under autocast, peft's LoRA layer costs far more than its two rank-r matmuls: the base
layer casts the fp32 input to bf16, dropout makes an fp32 copy with its own random number
per element, ``lora_A`` casts that to bf16 again, and the output gets a separate multiply
by ``scaling`` and an add, each with a backward. On a 2-core Xeon with AMX, where the
matmuls themselves are fast, turning LoRA's dropout off alone took an all-linear SmolLM2
step from 446 to 607 tokens/s; these layers took it to 557-602 with dropout on
(``benchmarks/README.md``). :class:`_LoraLinearBf16` computes the same function with:

- one bf16 copy of the input, shared by every adapted layer reading the same tensor (q, k
  and v; gate and up) and kept for the backward instead of an fp32 dropped input;
- dropout as a list of dropped positions (:func:`~peftbench.training.dropout.
  drop_positions`): a Bernoulli(``p``) mask drawn from about ``p`` random numbers per
  element instead of one, kept for the backward (``8 p`` bytes per element), applied by
  zeroing those positions; the ``1/(1-p)`` scale is folded into ``B``, so no multiplier
  tensor exists;
- the adapter's output added into the base matmul's output (``addmm_``).

The matmuls run in bf16 and gradients reach the fp32 input in fp32, as under autocast;
rounding differs from peft's order by bf16 rounding only (tested). Dropout masks are
other draws than ``nn.Dropout``'s (same distribution, ``p`` exact to the float32 resolution
of the uniform draws, 2^-24), so exact fp32 runs do not use this. Where a C compiler is
available, :mod:`~peftbench.training.lora_kernel` computes these layers instead (with its
own masks); this module is the fallback and the reference its tests compare with.
"""

from __future__ import annotations

from typing import Any

import torch

from peftbench.training.dropout import adapter_dropout, zero_positions

_BF16 = torch.bfloat16
_CAST_CACHE = "_peftbench_bf16_copy"


def shared_bf16_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bf16: the copy made for an earlier layer reading the same unchanged tensor,
    else a new one (remembered on ``x``, freed with it). Unchanged means the same version
    counter: a write through ``x.data`` would not be seen (autograd's own rule too)."""
    if x.dtype == _BF16:
        return x
    if x.is_inference() or torch.is_inference_mode_enabled():
        # no version counter to check against / a copy that grad mode could not save
        return x.to(_BF16)
    cached = getattr(x, _CAST_CACHE, None)
    if cached is not None and cached[0] == x._version:
        return cached[1]
    copy = x.detach().to(_BF16)
    setattr(x, _CAST_CACHE, (x._version, copy))
    return copy


def base_plus_adapter(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      hidden: torch.Tensor, scaled_b: torch.Tensor) -> torch.Tensor:
    """``rows W^T (+ bias) + hidden scaled_b^T``, the adapter's output added inside the base
    matmul's output buffer (no separate multiply and add over the output); all operands in
    one dtype. Shared by the fp32 and bf16 fused layers."""
    out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
    return out.addmm_(hidden, scaled_b.t())


class _LoraLinearBf16(torch.autograd.Function):
    """``x W^T (+ bias) + scaling * dropout(x) A^T B^T`` in bf16; only A and B are trained
    (and the bias, if it requires a gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                p: float) -> torch.Tensor:
        rows = shared_bf16_copy(x).reshape(-1, x.shape[-1])
        positions, scale = adapter_dropout(rows, p, scaling)
        a = lora_a.to(_BF16)
        b = (lora_b * scale).to(_BF16)
        # every operand is bf16 already, so autocast has nothing to cast here
        hidden = zero_positions(rows, positions) @ a.t()
        out = base_plus_adapter(rows, weight, None if bias is None else bias.to(_BF16),
                                hidden, b)
        ctx.save_for_backward(rows, weight, a, b, hidden, positions)
        ctx.scale, ctx.x_dtype, ctx.bias_dtype = scale, x.dtype, getattr(bias, "dtype", None)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, a, b, hidden, positions = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(_BF16)
        grad_x = grad_bias = grad_a = grad_b = None
        grad_hidden = g @ b  # (tokens, r)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ hidden).float().mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_hidden.t() @ zero_positions(rows, positions)).float()
        if ctx.needs_input_grad[0]:
            lora_part = grad_hidden @ a
            zero_positions(lora_part, positions, out=lora_part)
            grad_x = (g @ weight).to(ctx.x_dtype).add_(lora_part)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def lora_linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                     p: float) -> torch.Tensor:
    """The adapted layer's output in bf16 (``p``: the dropout probability, 0 when off)."""
    return _LoraLinearBf16.apply(x, weight, bias, lora_a, lora_b, scaling, p)
