"""The gated MLP's activation computed again in the backward instead of kept.

Llama-style MLPs compute ``down(silu(gate(x)) * up(x))``. Autograd keeps four
intermediate-size tensors per layer for that: ``silu``'s input, its output, ``up(x)`` and the
product, which ``down`` keeps as its input (for its weight's or its LoRA ``A``'s gradient).
Here only ``gate(x)`` and ``up(x)`` are kept:

- :class:`_SiluGate` computes ``silu`` again in its backward;
- while ``down`` runs, the product it keeps is kept as a note to compute it again from
  ``gate(x)`` and ``up(x)`` when ``down``'s backward needs it
  (:class:`~peftbench.training.saved_notes.Notes`).

Both are cheap element-wise passes, and the values and gradients are bit-for-bit autograd's.
In one SmolLM2-135M LoRA step (16 x 53 tokens) each of those tensors is 149 MiB over the 30
layers.

Under bf16 on the CPU the same MLPs instead run ``silu(gate) * up`` through the compiled
kernel of :mod:`~peftbench.training.cpu_kernels` (:func:`compile_silu_gates`): one pass
each way, keeping ``gate`` and ``up`` for the backward (autograd keeps ``silu``'s output
too); the forward's values are eager's, the gradients rounded once instead of twice.

Only MLP classes whose forward is exactly that expression (:data:`GATED_SILU_MLPS`) and whose
activation is SiLU are changed; anything else keeps its own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.training import cpu_kernels
from peftbench.training.forward_routing import route_forwards
from peftbench.training.saved_notes import Notes

_ORIGINAL_FORWARD = "_peftbench_mlp_forward"

#: transformers MLP classes computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
#: (their forward is LlamaMLP's, pinned by a test against the installed transformers)
GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP",
                             "Olmo2MLP", "GraniteMLP", "GemmaMLP"})


class _SiluGate(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` (not ``silu(gate)``) for the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _silu_gate_backward(grad, *ctx.saved_tensors, ctx.needs_input_grad)


def _silu_gate_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        needed: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``silu(gate) * up`` (those ``needed``) with PyTorch's operations."""
    grad_gate = grad_up = None
    if needed[1]:
        grad_up = grad * F.silu(gate)
    if needed[0]:
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    return grad_gate, grad_up


class _CompiledSiluGate(torch.autograd.Function):
    """``silu(gate) * up`` by the compiled kernel, keeping ``gate`` and ``up`` (bf16)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return cpu_kernels.silu_mul(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        if cpu_kernels.gate_accepts(grad, gate, up):
            return cpu_kernels.silu_mul_backward(grad, gate, up)
        return _silu_gate_backward(grad, gate, up, ctx.needs_input_grad)


def _is_silu(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return type(module) in (nn.SiLU, SiLUActivation)


def _fusable(module: nn.Module) -> bool:
    return (type(module).__name__ in GATED_SILU_MLPS and _is_silu(getattr(module, "act_fn", None))
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")))


def _gated_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = _SiluGate.apply(gate, up)
    if not product.requires_grad or torch.compiler.is_compiling():
        return self.down_proj(product)
    notes = Notes()
    notes.add(product, lambda: F.silu(gate).mul_(up))
    with notes.active():
        return self.down_proj(product)


def _compiled_gated_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if cpu_kernels.gate_accepts(gate, up) and not torch.compiler.is_compiling():
        return self.down_proj(_CompiledSiluGate.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def compile_silu_gates(model: nn.Module) -> int:
    """Route every gated SiLU MLP of ``model`` through the compiled kernel (used where
    ``gate`` and ``up`` arrive as contiguous CPU bf16); returns how many, 0 when the kernel
    is not available (idempotent). Parameters and state dict are unchanged."""
    if not cpu_kernels.available():
        return 0
    return route_forwards(model, _fusable, _compiled_gated_forward, _ORIGINAL_FORWARD)


def fuse_silu_gates(model: nn.Module) -> int:
    """Route every gated SiLU MLP of ``model`` through :class:`_SiluGate`; returns how many
    (idempotent). Parameters and state dict are unchanged."""
    return route_forwards(model, _fusable, _gated_forward, _ORIGINAL_FORWARD)
