"""Dropout with cheap random masks, for CPU training.

torch's CPU dropout draws one Mersenne-Twister number per element (``bernoulli_``) and
keeps a 4-byte mask per element for the backward. With LoRA on every linear layer of
SmolLM2 that is 210 masks per step and measured 24 % of a training step on 2 cores
(``bernoulli_`` alone; ``benchmarks/README.md``). Here the mask is drawn as the list of
dropped positions (:func:`drop_positions`): the gaps between the dropped elements of an
i.i.d. Bernoulli(``p``) mask are i.i.d. geometric, so they are drawn directly, about ``p``
uniform numbers per element instead of one. The positions are kept for the backward
(``8 p`` bytes per element, 0.4 at ``p = 0.05``) and the mask is applied by zeroing them
(:func:`zero_positions`). It is the distribution of ``nn.Dropout``: every element is dropped
independently with probability ``p`` (exact to the float32 resolution of the uniform draws,
2^-24) and kept elements are scaled by ``1 / (1 - p)``. Positions come from torch's default
generator, so ``torch.manual_seed`` makes them reproducible; they are other masks than
``nn.Dropout``'s, which is why exact fp32 runs (``precision: fp32``) keep ``nn.Dropout``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: uniform numbers drawn per round beyond the expected count: enough for the whole range
#: with probability ~1 - 1e-9 (a shortfall draws another round)
_MARGIN_SIGMAS, _MARGIN_EXTRA = 6.0, 16


def drop_positions(count: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted flat indices of the elements an i.i.d. Bernoulli(``p``) dropout zeroes among
    ``count`` (int64), drawn from torch's default generator.

    The gaps between dropped positions of a Bernoulli process are i.i.d. geometric, so they
    are drawn directly, ``floor(log(1 - u) / log(1 - p)) + 1`` for uniform ``u``: about
    ``p * count`` numbers instead of ``count`` (gaps beyond the range are clipped to it).
    """
    if count <= 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(count, device=device)
    log_keep = math.log1p(-p)
    parts: list[torch.Tensor] = []
    last = -1  # the last position drawn so far
    while last < count:
        # every gap is at least 1, so more than the positions left are never needed
        left = count - last
        spread = _MARGIN_SIGMAS * math.sqrt(max(left * p, 1.0) * (1.0 - p))
        draws = max(1, min(int(left * p + spread) + _MARGIN_EXTRA, left))
        gaps = torch.empty(draws, dtype=torch.float32, device=device).uniform_()
        gaps = gaps.neg_().log1p_().div_(log_keep).floor_().clamp_(max=count)
        gaps = gaps.to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(last)
        last = int(positions[-1])
        parts.append(positions)
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, count))]


def adapter_dropout(rows: torch.Tensor, p: float,
                    scaling: float) -> tuple[torch.Tensor | None, float]:
    """A LoRA layer's dropout with ``1 / (1 - p)`` folded into ``B``: the positions dropped
    among ``rows`` (None when ``p`` is 0) and ``scaling / (1 - p)``, the scale of ``B``
    that keeps the expected output (0 when every element is dropped)."""
    positions = drop_positions(rows.numel(), p, rows.device) if p > 0.0 else None
    return positions, (scaling / (1.0 - p) if p < 1.0 else 0.0)


def zero_positions(values: torch.Tensor, positions: torch.Tensor | None,
                   out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``values * scale`` with the flat ``positions`` (row-major order) set to 0: written into
    ``out`` (contiguous, ``values``' shape) if given, else into a new contiguous tensor, or
    ``values`` itself when there is nothing to change (no positions, scale 1, no ``out``)."""
    if out is None and positions is None and scale == 1.0:
        return values
    if out is None:
        out = torch.empty_like(values, memory_format=torch.contiguous_format)
    if scale == 1.0:
        if out is not values:
            out.copy_(values)
    else:
        torch.mul(values, scale, out=out)
    if positions is not None:
        out.view(-1).index_fill_(0, positions, 0.0)
    return out


class Scratch:
    """Grow-only buffers, one per named slot, for tensors that live only inside one call of
    a fused fp32 LoRA function (the dropped input, products the backward does not return).

    Allocated fresh in every adapted layer, those short-lived tensors left holes between
    the activations kept for the backward, too small for the next ones, so the heap kept
    growing: one all-linear LoRA step of SmolLM2 (fp32, 1085 tokens) took a 2.5 GB heap for
    1.6 GB of live memory; in slots, 1.66 GB (``benchmarks/README.md``). A slot keeps what its
    largest use needed and is reused by every layer. Nothing in a slot may be returned to
    autograd or kept: the next call overwrites it. Not used under ``torch.compile``.
    """

    _buffers: ClassVar[dict[tuple[str, torch.device], torch.Tensor]] = {}

    @classmethod
    def take(cls, slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` in ``slot``'s memory; its old contents are garbage."""
        count = math.prod(shape)
        key = (slot, torch.device(device))
        buffer = cls._buffers.get(key)
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            buffer = torch.empty(count, dtype=dtype, device=device)
            cls._buffers[key] = buffer
        return buffer[:count].view(shape)


class _Dropout(torch.autograd.Function):
    """``x / (1 - p)`` with the drawn positions zeroed; the backward zeroes the same ones."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        positions = drop_positions(x.numel(), p, x.device)
        ctx.save_for_backward(positions)
        ctx.scale = 1.0 / (1.0 - p)
        return zero_positions(x, positions, scale=ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (positions,) = ctx.saved_tensors
        return zero_positions(grad, positions, scale=ctx.scale), None


class FastDropout(nn.Module):
    """Drop-in replacement for ``nn.Dropout`` (same ``p``, same train/eval behaviour)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        if torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)  # the compiler draws its own masks
        return _Dropout.apply(x, self.p)

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
