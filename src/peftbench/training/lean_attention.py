"""Scaled dot-product attention that keeps less for the backward, with the same arithmetic.

transformers' ``sdpa`` attention, on a padded batch on CPU, keeps two things per layer that
torch's CPU flash-attention kernel does not need:

- **keys and values repeated per query head.** With grouped-query attention and a mask,
  transformers repeats every key/value head for each query head of its group
  (``repeat_kv``) and the kernel keeps the copies: SmolLM2-135M has 3 key/value heads for 9
  query heads, so each layer kept three times the keys and values it has. The kernel takes
  the groups itself (``enable_gqa=True``), mask included, and keeps them once.
- **the mask, once per layer.** The kernel turns a boolean mask into an additive float mask
  (``0`` / ``-inf``) on every call and keeps that copy: ``batch x length^2`` floats per
  layer, 500 MB over SmolLM2's 30 layers for 16 inputs of 512 tokens. Here the float mask is
  made once per forward (the layers share the boolean mask) and every layer gets the same
  tensor.

Outputs and gradients are bit for bit those of transformers' call (tested on whole models).
:func:`lean_sdpa` is registered with transformers' ``AttentionInterface`` (and its mask with
``AttentionMaskInterface``) under :data:`IMPLEMENTATION`. It handles only the training shape
(CPU, queries as long as keys, no position bias or softcap) and hands everything else,
generation steps included, to transformers' own ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the attention implementation name models are switched to
IMPLEMENTATION = "peftbench_lean_sdpa"
#: keyword arguments ``sdpa_attention_forward`` acts on (it ignores the others)
_HANDED_ON = ("softcap", "output_attentions", "position_bias")
#: where a boolean mask keeps its additive float version (one per forward, shared by layers)
_ADDITIVE = "_peftbench_additive_mask"


def once_per_mask(mask: torch.Tensor, name: str, build: Callable[[torch.Tensor], Any]) -> Any:
    """``build(mask)``, kept on the mask as attribute ``name`` and made again only when the
    mask changes in place: the layers of one forward share one mask tensor."""
    version, value = getattr(mask, name, (None, None))
    if value is None or version != mask._version:
        value = build(mask)
        setattr(mask, name, (mask._version, value))
    return value


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's own conversion of a boolean mask: ``0`` where True, ``-inf`` where False."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(mask.logical_not(), float("-inf"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`additive_mask`, made once per mask tensor, version and dtype."""
    return once_per_mask(mask, f"{_ADDITIVE}_{str(dtype).removeprefix('torch.')}",
                         lambda m: additive_mask(m, dtype))


def is_training_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      kwargs: dict[str, Any]) -> bool:
    """A CPU training call these kernels handle: queries as long as the keys (more than
    one), keys and values of one head size, none of the keyword arguments
    ``sdpa_attention_forward`` acts on besides the mask, not traced or compiled."""
    return (query.device.type == "cpu" and query.shape[2] == key.shape[2]
            and query.shape[2] > 1 and key.shape[-1] == value.shape[-1]
            and not any(kwargs.get(name) is not None and kwargs.get(name) is not False
                        for name in _HANDED_ON)
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def lean_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` with key/value groups passed to the kernel
    and a boolean mask made additive once."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not is_training_shape(query, key, value, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = _additive(mask, query.dtype)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(attention_mask is None and causal),
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1)
    return output.transpose(1, 2).contiguous(), None


def switch_attention(model: nn.Module, implementation: str,
                     forward: Callable[..., tuple[torch.Tensor, Any]]) -> int:
    """Register ``forward`` (with sdpa's masks) as attention ``implementation`` and switch
    every Hugging Face model in ``model`` that uses ``sdpa`` to it; returns how many models
    use it (idempotent). A model that refuses the switch keeps its own attention."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    switched: set[int] = set()  # configs: a causal LM and its inner model share one
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or id(module.config) in switched:
            continue
        config = module.config
        if (config._attn_implementation == "sdpa"
                and getattr(module, "_can_set_attn_implementation", lambda: True)()):
            AttentionInterface.register(implementation, forward)
            AttentionMaskInterface.register(implementation, sdpa_mask)
            # a model that refuses the switch keeps its own attention: not worth failing over
            with contextlib.suppress(ValueError, ImportError):
                module.set_attn_implementation(implementation)
        if config._attn_implementation == implementation:
            switched.add(id(config))
    return len(switched)


def use_lean_attention(model: nn.Module) -> int:
    """Switch every Hugging Face model in ``model`` that uses ``sdpa`` attention to
    :func:`lean_sdpa`; returns how many models (idempotent)."""
    return switch_attention(model, IMPLEMENTATION, lean_sdpa)
