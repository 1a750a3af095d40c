"""A tiny Llama with LoRA whose adapters contribute, shared by the fused-LoRA tests. No tests
here: import ``tiny_lora_llama``."""

from __future__ import annotations

import torch

from peftbench.methods import get_method
from peftbench.models import load_model


def tiny_lora_llama(method_args: dict | None = None) -> torch.nn.Module:
    """``tiny-random-llama`` with peftbench's LoRA (``method_args`` over its defaults), in
    train mode, seeded; ``B`` drawn at random (peft starts it at zero, where the adapter
    contributes nothing and every ``A`` gradient is zero)."""
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    torch.manual_seed(0)
    model = lora.apply(loaded.model, lora.resolve_args(method_args or {}),
                       encoder_decoder=False).train()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model
