"""Mixed precision done once: frozen weights stored in bf16, trainable ones kept in fp32.

Under bf16 autocast every matmul runs in bf16 anyway; storing the frozen base weights in
bf16 removes the per-step re-cast of the whole model and halves its memory. Trainable
parameters (and so AdamW's state) stay fp32 for exact accumulation of small updates.
"""

from __future__ import annotations

import torch
from torch import nn


def store_frozen_in_bf16(model: nn.Module) -> int:
    """Cast frozen floating-point parameters to bf16 in place; returns how many elements."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)
            cast += param.numel()
    return cast
