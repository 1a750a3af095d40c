"""LoRA layers as one autograd function, for CPU training (fp32 here; bf16 in its own module).

peft computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a dropout
over the input, kept in full for ``lora_A``'s weight gradient in every adapted layer, two
small matmuls, a multiply by ``scaling`` and an add over the whole output, each with its
own backward. :class:`_LoraLinear` does the same arithmetic with fewer passes over memory:

- the adapter's output is added inside the base matmul's output buffer (``addmm_`` with
  ``scaling / (1 - p) * lora_B``): no separate multiply and add over the output, and no
  dropout scale over the input;
- dropout is a list of dropped positions (:func:`~peftbench.training.dropout.
  drop_positions`, about ``p`` random numbers per element), kept for the backward
  (``8 p`` bytes per element) and applied by zeroing them in a copy of the input; it
  keeps the input ``x`` itself for the backward (q, k and v, or gate and up, read the same
  tensor, so it is kept once), not a dropped copy per adapted layer;
- the dropped input and the backward's products that are not returned live in reused
  :class:`~peftbench.training.dropout.Scratch` memory, not in fresh tensors per layer;
- the masks are :mod:`~peftbench.training.dropout`'s (same distribution as ``nn.Dropout``,
  other draws), so exact fp32 runs (``precision: fp32``) do not use it.

Only plain LoRA on a frozen ``nn.Linear`` with one active adapter is fused (no DoRA, no
LoRA bias, no ``fan_in_fan_out``): outside autocast in fp32 here, under CPU bf16 autocast
over bf16-stored weights by the compiled :mod:`~peftbench.training.lora_kernel` where a C
compiler is available, else by :mod:`~peftbench.training.fused_lora_bf16`; anything else,
and anything under ``torch.compile``, runs peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftbench.training import lora_kernel
from peftbench.training.dropout import FastDropout, Scratch, adapter_dropout, zero_positions
from peftbench.training.forward_routing import route_forwards
from peftbench.training.fused_lora_bf16 import base_plus_adapter, lora_linear_bf16
from peftbench.training.lora_kernel import lora_linear_kernel

_ORIGINAL_FORWARD = "_peftbench_peft_forward"


class _LoraLinear(torch.autograd.Function):
    """``x W^T (+ bias) + scaling * dropout(x) A^T B^T``; only A and B are trained
    (and the bias, if it requires a gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                p: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        positions, scale = adapter_dropout(rows, p, scaling)
        dropped = rows if positions is None else zero_positions(
            rows, positions, _scratch("lora_dropped", rows))
        hidden = dropped @ lora_a.t()
        scaled_b = lora_b * scale
        out = base_plus_adapter(rows, weight, bias, hidden, scaled_b)
        ctx.save_for_backward(x, weight, lora_a, scaled_b, hidden, positions)
        ctx.scale = scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, scaled_b, hidden, positions = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_hidden = g @ scaled_b  # (tokens, r)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ hidden).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            rows = x.reshape(-1, x.shape[-1])
            if positions is not None:
                rows = zero_positions(rows, positions, _scratch("lora_work", rows))
            grad_a = grad_hidden.t() @ rows
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if positions is None:
                grad_x.addmm_(grad_hidden, lora_a)
            else:
                lora_part = torch.mm(grad_hidden, lora_a,
                                     out=_scratch("lora_work", grad_x))
                grad_x.add_(zero_positions(lora_part, positions, out=lora_part))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _scratch(slot: str, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like`` in :class:`Scratch` ``slot``'s memory (garbage)."""
    return Scratch.take(slot, like.shape, like.dtype, like.device)


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
    p = active.p if active is not None else 0.0
    if torch.compiler.is_compiling():  # peft's: the compiler fuses it, with its own masks
        return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)
    if torch.is_autocast_enabled(x.device.type):
        if _bf16_fusable(x, base.weight, lora_a, lora_b):
            if lora_kernel.accepts(x, base.weight, p, lora_a.shape[0]):
                return lora_linear_kernel(x, base.weight, base.bias, lora_a, lora_b, scaling, p)
            return lora_linear_bf16(x, base.weight, base.bias, lora_a, lora_b, scaling, p)
    elif x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype == torch.float32:
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling, p)
    return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)


def _bf16_fusable(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor) -> bool:
    """CPU bf16 autocast over a bf16-stored frozen weight, fp32 adapter, fp32 or bf16 input."""
    return (x.device.type == "cpu" and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and lora_a.dtype == lora_b.dtype == torch.float32)


def kernel_rank_layers(model: nn.Module) -> int:
    """How many of ``model``'s routed LoRA layers have a rank the compiled kernels take
    (:func:`~peftbench.training.cpu_kernels.lora_max_rank`; the others run the PyTorch bf16
    layer); 0 without the kernels. For the run record."""
    return sum(1 for module in model.modules()
               if hasattr(module, _ORIGINAL_FORWARD) and _fusable(module)
               and lora_kernel.takes_rank(_rank(module)))


def _rank(module: nn.Module) -> int:
    return module.lora_A[module.active_adapters[0]].weight.shape[0]


def fuse_lora_layers(model: nn.Module) -> int:
    """Route every fusable LoRA layer of ``model`` through :class:`_LoraLinear`; returns how
    many (idempotent). Call after :func:`~peftbench.training.dropout.use_fast_dropout`. The
    parameters, and so the saved adapter, stay peft's."""
    return route_forwards(model, _fusable, _fused_forward, _ORIGINAL_FORWARD)
