"""Dropout with cheap random masks, for CPU training.

torch's CPU dropout draws one Mersenne-Twister number per element (``bernoulli_``) and
keeps a 4-byte mask per element for the backward. With LoRA on every linear layer of
SmolLM2 that is 210 masks per step and measured 24 % of a training step on 2 cores
(``bernoulli_`` alone; ``benchmarks/README.md``). :class:`FastDropout` draws 64 random bits
per call of the generator and cuts them into four 16-bit numbers, one per element. For the
backward it keeps no mask but the generator state the numbers came from (5 kB) and draws
them again (:class:`BitsForBackward`; 0.7 ms for 1085 x 576 elements on 2 cores): the
2 bytes per element kept before were 242 MiB of the 1308 MiB of activations one SmolLM2
LoRA step (all linear layers, 16 x 53 tokens) keeps for its backward. The mask is the
same distribution: every element is kept independently with probability ``1 - p``, where
``p`` is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and kept elements are
scaled by the exact inverse of the keep probability, so the expected output equals the
input as with ``nn.Dropout``. Masks come from torch's default generator, so
``torch.manual_seed`` makes them reproducible; they are different masks from
``nn.Dropout``'s, which is why fp32 mode (the exactness reference) keeps ``nn.Dropout``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

_LEVELS = 65536  # 16-bit random numbers
_INT16_MIN = -32768


class Scratch:
    """Grow-only buffers, one per named slot, for tensors that live only inside one call of
    a dropout or fused LoRA function (random bits, multipliers, the dropped input).

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


def keep_multiplier(bits: torch.Tensor, threshold: int, scale: float,
                    slot: str | None = None) -> torch.Tensor:
    """fp32 ``scale`` where ``bits >= threshold``, else 0; in :class:`Scratch` ``slot``'s
    memory if given.

    Built with same-dtype ops only (mixed bool/float element-wise ops take torch's slow
    casting path on CPU, and an int16 - float op allocates a converted copy): fp32 holds
    every 16-bit value exactly (bf16 does not, which would move the threshold) and the exact
    ``scale``.
    """
    if slot is None:
        multiplier = bits.to(torch.float32)
    else:
        multiplier = Scratch.take(slot, bits.shape, torch.float32, bits.device).copy_(bits)
    return multiplier.sub_(threshold - 0.5).clamp_(0, 1).ceil_().mul_(scale)


def masked_scale(x: torch.Tensor, bits: torch.Tensor, threshold: int, scale: float,
                 slot: str | None = None) -> torch.Tensor:
    """``x * scale`` where ``bits >= threshold``, else 0, in ``x``'s dtype (a new tensor; the
    multiplier in :class:`Scratch` ``slot`` if given)."""
    return (x * keep_multiplier(bits, threshold, scale, slot)).to(x.dtype)


class _MaskedScale(torch.autograd.Function):
    """``x * multiplier(bits)``; the backward rebuilds the multiplier from the same bits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        bits = BitsForBackward.draw(ctx, x.shape, x.device)
        ctx.save_for_backward(BitsForBackward.to_keep(ctx, bits))
        ctx.threshold, ctx.scale = threshold, scale
        return masked_scale(x, bits, threshold, scale, BitsForBackward.slot(ctx, "keep"))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        bits = BitsForBackward.again(ctx, *ctx.saved_tensors)
        return (masked_scale(grad, bits, ctx.threshold, ctx.scale,
                             BitsForBackward.slot(ctx, "keep")), None, None)


def random_int16(shape: torch.Size, device: torch.device,
                 generator: torch.Generator | None = None,
                 scratch: bool = False) -> torch.Tensor:
    """Uniform 16-bit integers: 64-bit draws of ``generator`` (default: torch's), cut in four;
    with ``scratch``, in :class:`Scratch` memory.

    Under ``torch.compile`` they are drawn with ``randint`` instead (the compiler's own
    generator, seeded from torch's): the compiler mishandles a view of int64 as int16.
    """
    if torch.compiler.is_compiling():
        return torch.randint(_INT16_MIN, -_INT16_MIN, shape, dtype=torch.int16, device=device)
    count = shape.numel()
    size = ((count + 3) // 4,)
    words = (Scratch.take("random_bits", size, torch.int64, device) if scratch
             else torch.empty(size, dtype=torch.int64, device=device))
    # the full 64-bit range: every 16-bit slice is uniform
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:count].view(shape)


class BitsForBackward:
    """Random bits an autograd function needs again in its backward, kept as the CPU
    generator's state (drawn again there from a private generator, so torch's own stream
    is not moved) or, under ``torch.compile`` and off the CPU, as the bits themselves.

    Forward: ``bits = draw(ctx, ...)``, then ``to_keep(ctx, bits)`` among the tensors given
    to ``save_for_backward``; backward: ``again(ctx, that saved entry)``. Bits that are drawn
    again live in :class:`Scratch` memory, valid until the next draw; ``slot`` says whether
    what is computed from them may use scratch memory too.
    """

    @staticmethod
    def draw(ctx: Any, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Uniform 16-bit integers of ``shape``, remembering how to get them again."""
        ctx.bits_state = None
        if torch.compiler.is_compiling() or device.type != "cpu":
            return random_int16(shape, device)
        ctx.bits_state, ctx.bits_shape = torch.get_rng_state(), shape
        return random_int16(shape, device, scratch=True)

    @staticmethod
    def slot(ctx: Any, name: str) -> str | None:
        """``name`` where this call works in scratch memory, else None."""
        return None if ctx.bits_state is None else name

    @staticmethod
    def to_keep(ctx: Any, bits: torch.Tensor) -> torch.Tensor | None:
        """What to save for the backward: nothing if the bits can be drawn again."""
        return bits if ctx.bits_state is None else None

    @staticmethod
    def again(ctx: Any, kept: torch.Tensor | None) -> torch.Tensor:
        """The forward's bits: drawn again from the saved state, or the kept ones."""
        if ctx.bits_state is None:
            assert kept is not None
            return kept
        generator = torch.Generator()
        generator.set_state(ctx.bits_state)
        return random_int16(ctx.bits_shape, torch.device("cpu"), generator, scratch=True)


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
        return _MaskedScale.apply(x, self.threshold, self.scale)

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
