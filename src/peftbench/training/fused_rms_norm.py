"""Llama-style RMSNorm as one autograd function with a closed-form backward (CPU bf16 path).

Autograd records LlamaRMSNorm's forward as six operations and runs about a dozen in its
backward, some of them over a row factor broadcast across the hidden size. Here the
forward runs transformers' operations without recording them (values bit for bit equal)
and the backward is the closed form, with ``n = x * r`` and ``r = rsqrt(mean(x^2) + eps)``
per row::

    dL/dx = r * (g_n - x * r^2 * mean(g_n * x)),   g_n = weight * g
    dL/dweight = sum over rows of g * n           (only when the weight trains)

It keeps ``x``, ``r`` and the weight for the backward, less than autograd kept.

Under autocast the output is returned in the autocast dtype, bf16 on this path (the fp32
product rounded once).
The readers of these norms' outputs in the supported models are matmuls (q, k, v; gate,
up; the output head), which autocast would cast the fp32 output to bf16 for with the same
rounding, so the values they compute with are unchanged. What changes is the backward:
their input gradients come back in bf16 and autograd adds them in bf16, instead of casting
each to fp32 and adding in fp32 (one more bf16 rounding of that sum), and the fp32 output
and its casts are never written. Measured on an all-linear SmolLM2 LoRA step, steps
alternating in one process: 1.5-3 % faster; BitFit 4-5 % (``benchmarks/README.md``).
Readers that are not matmuls (Qwen3's per-head q/k norms feed the rotary embedding) see
the bf16-rounded value that autocast would only have made at the attention's input.

Where the input is the float32 residual stream and the output bf16 (the usual CPU bf16
case), the forward and the input gradient each run as one compiled pass
(:mod:`~peftbench.training.cpu_kernels`; the PyTorch operations above otherwise): the same
formulas, with the row sums in another order and ``weight * g`` not rounded to bf16 first.

Only norm classes whose forward is exactly LlamaRMSNorm's are routed
(:func:`~peftbench.training.rms_norm.is_llama_rms_norm`); without gradients, and under
``torch.compile``, the norm's own forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftbench.training import cpu_kernels
from peftbench.training.forward_routing import route_forwards
from peftbench.training.rms_norm import is_llama_rms_norm

_ORIGINAL = "_peftbench_fused_norm_forward"


class _RmsNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, reduced over the last dim."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.compiled = (out_dtype == torch.bfloat16 and cpu_kernels.norm_accepts(x, weight)
                        and cpu_kernels.available())
        if ctx.compiled:
            out, scale = cpu_kernels.rms_norm(x, weight, eps)
            ctx.save_for_backward(x, scale, weight)
            return out
        xf = x.to(torch.float32)
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * scale).to(x.dtype)
        if out_dtype is None or out_dtype == torch.result_type(weight, normed):
            out = weight * normed
        else:  # the product rounded once, as the cast of the plain output would round it
            out = torch.empty(normed.shape, dtype=out_dtype, device=normed.device)
            torch.mul(weight, normed, out=out)
        ctx.save_for_backward(x, scale, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, weight = ctx.saved_tensors
        xf = x.to(torch.float32)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (xf * scale).to(x.dtype)
            rows = tuple(range(grad.dim() - 1))
            grad_weight = (grad * normed).sum(rows).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.compiled and grad.dtype == torch.bfloat16:
            grad_x = cpu_kernels.rms_norm_backward(grad.contiguous(), x, weight, scale)
        elif ctx.needs_input_grad[0]:  # the closed form above, in fp32
            grad_normed = (grad * weight).to(torch.float32)
            coef = torch.linalg.vecdot(grad_normed, xf).unsqueeze(-1)
            coef.mul_(scale.square()).div_(x.shape[-1])
            grad_x = torch.addcmul(grad_normed, xf, coef, value=-1).mul_(scale).to(x.dtype)
        return grad_x, grad_weight, None, None


def _forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return getattr(self, _ORIGINAL)(hidden_states)
    device = hidden_states.device.type
    # under autocast, the dtype its matmuls would cast this output to
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return _RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route the Llama-style RMSNorms of ``model`` through :class:`_RmsNorm`; returns how many
    (idempotent). Parameters and state dict are unchanged."""
    return route_forwards(model, is_llama_rms_norm, _forward, _ORIGINAL)
