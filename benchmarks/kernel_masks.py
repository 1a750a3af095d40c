"""peftbench's LoRA dropout masks in a peft model: the loss check's same-masks reference.

peftbench's compiled LoRA layers (``peftbench.training.lora_kernel``) draw their dropout
masks from a hash of each element's index and a seed taken from torch's generator, not from
torch's Bernoulli stream, so their losses and the Trainer's follow different dropout draws
and drift apart for that reason alone. :class:`KernelMaskDropout` replaces a peft LoRA
layer's ``nn.Dropout``: it draws the seed where the compiled layer draws it (once per call,
from torch's default generator, before any other draw of that layer) and drops the elements
the compiled layer drops. A Trainer run with it (``trainer_masks``) differs from peftbench
only in arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.training import lora_kernel


class KernelMaskDropout(nn.Module):
    """``nn.Dropout(p)`` with the LoRA kernels' masks: the input seen as rows of its last
    dimension, element ``(i, c)`` kept where the kernels keep it for the seed drawn now."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} outside [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = lora_kernel.draw_seed()
        columns = x.shape[-1]
        keep = lora_kernel.dropout_mask(x.numel() // columns, columns, seed, self.p)
        return x * keep.view(x.shape).to(x.dtype) / (1.0 - self.p)


def use_kernel_masks(model: nn.Module) -> int:
    """Replace every peft LoRA dropout with p > 0 in ``model`` by a
    :class:`KernelMaskDropout`; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = KernelMaskDropout(dropout.p)
                replaced += 1
    return replaced
