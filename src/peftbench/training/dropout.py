"""Dropout with cheap random masks, for CPU training.

torch's CPU dropout draws one Mersenne-Twister number per element (``bernoulli_``) and
keeps a 4-byte mask per element for the backward. With LoRA on every linear layer of
SmolLM2 that is 210 masks per step and measured 24 % of a training step on 2 cores
(``bernoulli_`` alone; ``benchmarks/README.md``). :class:`FastDropout` draws 64 random bits
per call of the generator and cuts them into four 16-bit numbers, one per element, and
keeps those 2 bytes per element for the backward instead of a float mask. The mask is the
same distribution: every element is kept independently with probability ``1 - p``, where
``p`` is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and kept elements are
scaled by the exact inverse of the keep probability, so the expected output equals the
input as with ``nn.Dropout``. Masks come from torch's default generator, so
``torch.manual_seed`` makes them reproducible; they are different masks from
``nn.Dropout``'s, which is why fp32 mode (the exactness reference) keeps ``nn.Dropout``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_LEVELS = 65536  # 16-bit random numbers
_INT16_MIN = -32768


def keep_multiplier(bits: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """fp32 ``scale`` where ``bits >= threshold``, else 0.

    Built with same-dtype ops only (mixed bool/float element-wise ops take torch's slow
    casting path on CPU): fp32 holds every 16-bit value exactly (bf16 does not, which would
    move the threshold) and the exact ``scale``.
    """
    return bits.to(torch.float32).sub_(threshold - 0.5).clamp_(0, 1).ceil_().mul_(scale)


def masked_scale(x: torch.Tensor, bits: torch.Tensor, threshold: int,
                 scale: float) -> torch.Tensor:
    """``x * scale`` where ``bits >= threshold``, else 0, in ``x``'s dtype."""
    return (x * keep_multiplier(bits, threshold, scale)).to(x.dtype)


class _MaskedScale(torch.autograd.Function):
    """``x * multiplier(bits)``; the backward rebuilds the multiplier from the saved bits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: torch.Tensor, threshold: int,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(bits)
        ctx.threshold, ctx.scale = threshold, scale
        return masked_scale(x, bits, threshold, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (bits,) = ctx.saved_tensors
        return masked_scale(grad, bits, ctx.threshold, ctx.scale), None, None, None


def random_int16(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform 16-bit integers: 64-bit draws of the default generator, cut in four.

    Under ``torch.compile`` they are drawn with ``randint`` instead (the compiler's own
    generator, seeded from torch's): the compiler mishandles a view of int64 as int16.
    """
    if torch.compiler.is_compiling():
        return torch.randint(_INT16_MIN, -_INT16_MIN, shape, dtype=torch.int16, device=device)
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # the full 64-bit range: every 16-bit slice is uniform
    return words.view(torch.int16)[:count].view(shape)


class FastDropout(nn.Module):
    """Drop-in replacement for ``nn.Dropout`` (same ``p``, same train/eval behaviour)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p = p
        dropped_levels = round(p * _LEVELS)
        self.threshold = _INT16_MIN + dropped_levels  # keep where bits >= threshold
        kept = (_LEVELS - dropped_levels) / _LEVELS
        self.scale = 1.0 / kept if kept > 0 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == _INT16_MIN:
            return x
        if self.scale == 0.0:
            return torch.zeros_like(x)
        return _MaskedScale.apply(x, random_int16(x.shape, x.device), self.threshold,
                                  self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` with ``p > 0`` in ``model`` by :class:`FastDropout`;
    returns how many. Dropout modules carry no state, so saved adapters are unchanged."""
    replaced = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p)
                fast.train(child.training)
                setattr(module, name, fast)
                replaced += 1
    return replaced
