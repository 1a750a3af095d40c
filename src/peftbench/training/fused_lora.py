"""LoRA layers as one autograd function, for CPU training (fp32 here; bf16 in its own module).

peft computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a dropout
over the input, kept in full for ``lora_A``'s weight gradient in every adapted layer, two
small matmuls, a multiply by ``scaling`` and an add over the whole output, each with its
own backward. :class:`_LoraLinear` does the same arithmetic with fewer passes over memory:

- the adapter's output is added inside the base matmul's output buffer (``addmm_`` with
  ``scaling * lora_B``): no separate multiply and add over the output;
- it keeps the input ``x`` itself for the backward (q, k and v, or gate and up, read the
  same tensor, so it is kept once) and rebuilds the dropped input in the backward from
  the dropout's random numbers, drawn again there (:class:`~peftbench.training.dropout.
  BitsForBackward`), instead of keeping a 4-byte copy per adapted layer;
- the random numbers, the dropout multiplier, the dropped input and the backward's
  products that are not returned live in reused :class:`~peftbench.training.dropout.
  Scratch` memory, not in fresh tensors per layer;
- dropout draws :mod:`~peftbench.training.dropout`'s masks (same distribution as
  ``nn.Dropout``, other masks), so exact fp32 runs (``precision: fp32``) do not use it.

Only plain LoRA on a frozen ``nn.Linear`` with one active adapter is fused (no DoRA, no
LoRA bias, no ``fan_in_fan_out``): outside autocast in fp32 here, under CPU bf16 autocast
over bf16-stored weights by :mod:`~peftbench.training.fused_lora_bf16`; anything else runs
peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftbench.training.dropout import (
    BitsForBackward,
    FastDropout,
    Scratch,
    keep_multiplier,
)
from peftbench.training.forward_routing import route_forwards
from peftbench.training.fused_lora_bf16 import lora_linear_bf16

_ORIGINAL_FORWARD = "_peftbench_peft_forward"


class _LoraLinear(torch.autograd.Function):
    """``x W^T (+ bias) + scaling * dropout(x) A^T B^T``; only A and B are trained."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout: FastDropout | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scaled_b = lora_b * scaling
        dropped = rows
        kept_bits = None
        if dropout is not None:
            bits = BitsForBackward.draw(ctx, rows.shape, rows.device)
            kept_bits = BitsForBackward.to_keep(ctx, bits)
            slot = BitsForBackward.slot(ctx, "lora_dropped")
            dropped = keep_multiplier(bits, dropout.threshold, dropout.scale, slot).mul_(rows)
        hidden = dropped @ lora_a.t()
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(hidden, scaled_b.t())
        ctx.save_for_backward(x, weight, lora_a, scaled_b, hidden, kept_bits)
        ctx.scaling, ctx.dropout = scaling, dropout
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, scaled_b, hidden, kept_bits = ctx.saved_tensors
        dropout = ctx.dropout
        # the dropout multiplier, rebuilt once from the forward's bits for both gradients
        keep = None
        work = None  # the Scratch slot for products that are not returned
        if dropout is not None:
            bits = BitsForBackward.again(ctx, kept_bits)
            keep = keep_multiplier(bits, dropout.threshold, dropout.scale,
                                   BitsForBackward.slot(ctx, "lora_keep"))
            work = BitsForBackward.slot(ctx, "lora_work")
        g = grad.reshape(-1, grad.shape[-1])
        grad_hidden = g @ scaled_b  # (tokens, r)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ hidden).mul_(ctx.scaling)
        if ctx.needs_input_grad[3]:
            rows = x.reshape(-1, x.shape[-1])
            grad_a = grad_hidden.t() @ (rows if keep is None else _product(rows, keep, work))
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if keep is None:
                grad_x.addmm_(grad_hidden, lora_a)
            else:
                grad_x.addcmul_(_product(grad_hidden, lora_a, work, matmul=True), keep)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _product(a: torch.Tensor, b: torch.Tensor, slot: str | None,
             matmul: bool = False) -> torch.Tensor:
    """``a * b`` (or ``a @ b``), in :class:`Scratch` ``slot``'s memory if given."""
    op = torch.mm if matmul else torch.mul
    if slot is None:
        return op(a, b)
    shape = (a.shape[0], b.shape[1]) if matmul else a.shape
    return op(a, b, out=Scratch.take(slot, shape, a.dtype, a.device))


def _fusable(module: nn.Module) -> bool:
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or not isinstance(module.get_base_layer(), nn.Linear):
        return False
    if getattr(module, "fan_in_fan_out", False) or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    if getattr(module.lora_B[name], "bias", None) is not None:
        return False
    return isinstance(module.lora_dropout[name], FastDropout | nn.Identity)


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's forward as one autograd function in the plain case (fp32 outside autocast,
    bf16 under CPU autocast), else peft's own."""
    base = self.get_base_layer()
    if (args or kwargs or self.disable_adapters or self.merged or base.weight.requires_grad
            or len(self.active_adapters) != 1):
        return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    active = dropout if isinstance(dropout, FastDropout) and dropout.training else None
    scaling = float(self.scaling[name])
    if torch.is_autocast_enabled(x.device.type):
        if _bf16_fusable(x, base.weight, lora_a, lora_b):
            return lora_linear_bf16(x, base.weight, base.bias, lora_a, lora_b, scaling,
                                    active.p if active is not None else 0.0)
    elif x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype == torch.float32:
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling, active)
    return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)


def _bf16_fusable(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor) -> bool:
    """CPU bf16 autocast over a bf16-stored frozen weight, fp32 adapter, fp32 or bf16 input;
    not while compiling (the shared input copy is an attribute on the input tensor)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and lora_a.dtype == lora_b.dtype == torch.float32)


def fuse_lora_layers(model: nn.Module) -> int:
    """Route every fusable LoRA layer of ``model`` through :class:`_LoraLinear`; returns how
    many (idempotent). Call after :func:`~peftbench.training.dropout.use_fast_dropout`. The
    parameters, and so the saved adapter, stay peft's."""
    return route_forwards(model, _fusable, _fused_forward, _ORIGINAL_FORWARD)
