"""Llama-style RMSNorm as one autograd function with a closed-form backward (CPU bf16 path).

Autograd records LlamaRMSNorm's forward as six operations and runs about a dozen in its
backward, some of them over a row factor broadcast across the hidden size. Here the
forward runs transformers' operations without recording them (values bit for bit equal)
and the backward is the closed form, with ``n = x * r`` and ``r = rsqrt(mean(x^2) + eps)``
per row::

    dL/dx = r * (g_n - x * r^2 * mean(g_n * x)),   g_n = weight * g
    dL/dweight = sum over rows of g * n           (only when the weight trains)

It keeps ``x``, ``r`` and the weight for the backward, less than autograd kept. Only norm
classes whose forward is exactly LlamaRMSNorm's are routed
(:func:`~peftbench.training.rms_norm.is_llama_rms_norm`); without gradients, and under
``torch.compile``, the norm's own forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftbench.training.forward_routing import route_forwards
from peftbench.training.rms_norm import is_llama_rms_norm

_ORIGINAL = "_peftbench_fused_norm_forward"


class _RmsNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, reduced over the last dim."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * scale).to(x.dtype)
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
        if ctx.needs_input_grad[0]:  # the closed form above, in fp32
            grad_normed = (grad * weight).to(torch.float32)
            coef = torch.linalg.vecdot(grad_normed, xf).unsqueeze(-1)
            coef.mul_(scale.square()).div_(x.shape[-1])
            grad_x = torch.addcmul(grad_normed, xf, coef, value=-1).mul_(scale).to(x.dtype)
        return grad_x, grad_weight, None


def _forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return getattr(self, _ORIGINAL)(hidden_states)
    return _RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route the Llama-style RMSNorms of ``model`` through :class:`_RmsNorm`; returns how many
    (idempotent). Parameters and state dict are unchanged."""
    return route_forwards(model, is_llama_rms_norm, _forward, _ORIGINAL)
