"""Grouped-query attention that keeps its keys and values once, not once per query head.

For a padded batch, transformers' ``sdpa`` attention repeats every key and value head for
each query head of its group (``repeat_kv``) before calling
``scaled_dot_product_attention``, which keeps the repeated copies for the backward:
SmolLM2-135M has 3 key/value heads for 9 query heads, so each layer keeps three times the
keys and values it has. torch's CPU flash-attention kernel takes the groups itself
(``enable_gqa=True``), with a mask too, and keeps the un-repeated tensors; its outputs and
gradients are bit for bit those of the repeated call (tested on a whole model).

:func:`sdpa_grouped` is registered with transformers' ``AttentionInterface`` (and its mask
with ``AttentionMaskInterface``) under :data:`IMPLEMENTATION`. It handles only the training
shape (CPU, queries as long as keys, no position bias or softcap) and hands everything else,
generation steps included, to transformers' own ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the attention implementation name models are switched to
IMPLEMENTATION = "peftbench_sdpa_grouped"
#: keyword arguments ``sdpa_attention_forward`` acts on (it ignores the others)
_HANDED_ON = ("softcap", "output_attentions", "position_bias")


def sdpa_grouped(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` with key/value groups passed to the kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups <= 1 or query.device.type != "cpu" or query.shape[2] != key.shape[2]
            or query.shape[2] <= 1 or key.shape[-1] != value.shape[-1]
            or any(kwargs.get(name) is not None and kwargs.get(name) is not False
                   for name in _HANDED_ON) or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(attention_mask is None and causal), enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sdpa_grouped)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def group_attention_keys(model: nn.Module) -> int:
    """Switch every Hugging Face model in ``model`` that uses ``sdpa`` attention with
    grouped key/value heads to :func:`sdpa_grouped`; returns how many models (idempotent)."""
    from transformers import PreTrainedModel

    switched: set[int] = set()  # configs: a causal LM and its inner model share one
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or id(module.config) in switched:
            continue
        config = module.config
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if config._attn_implementation == "sdpa" and heads and kv_heads < heads:
            _register()
            module.set_attn_implementation(IMPLEMENTATION)
        if config._attn_implementation == IMPLEMENTATION:
            switched.add(id(config))
    return len(switched)
