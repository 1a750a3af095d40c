"""RMSNorm outputs computed again in the backward instead of kept by the layers reading them.

In a Llama-style decoder layer, the normalised input of the attention and of the MLP is
kept for the backward by the projections reading it (q, k and v; gate and up), for their
weights' or their LoRA ``A``'s gradients. It is ``weight * (x * rsqrt(mean(x^2) + eps))``,
and the norm's own backward keeps ``x`` and the ``rsqrt`` factor anyway. So inside each
decoder layer the normalised output is kept as a note
(:class:`~peftbench.training.saved_notes.Notes`) that computes it again from those, with
the same operations: values and gradients are bit-for-bit autograd's. In one SmolLM2-135M
all-linear LoRA step, that is two hidden-size tensors per layer less.

Only norm classes whose forward is exactly LlamaRMSNorm's (:data:`LLAMA_RMS_NORMS`, pinned
by a test) are changed; the layer scope is any module owning one of them directly, except
the model itself (its final norm feeds the output head, outside any layer).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from peftbench.training.forward_routing import route_forwards
from peftbench.training.saved_notes import Notes

_ORIGINAL_NORM = "_peftbench_norm_forward"
_ORIGINAL_LAYER = "_peftbench_layer_forward"

#: transformers norm classes whose forward is LlamaRMSNorm's (pinned by a test)
LLAMA_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                             "SmolLM3RMSNorm", "GraniteRMSNorm"})

#: the notes of the decoder layer running now, if any
_LAYER_NOTES: ContextVar[Notes | None] = ContextVar("peftbench_layer_notes", default=None)


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward, step for step, registering its output with the layer's notes."""
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    scale = torch.rsqrt(variance + self.variance_epsilon)
    output = self.weight * (x * scale).to(input_dtype)
    notes = _LAYER_NOTES.get()
    if notes is not None:
        weight = self.weight
        notes.add(output, lambda: weight * (x * scale).to(input_dtype))
    return output


def _layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward, with its norms' outputs kept as notes when training."""
    original = getattr(self, _ORIGINAL_LAYER)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return original(*args, **kwargs)
    notes = Notes()
    token = _LAYER_NOTES.set(notes)
    try:
        with notes.active():
            return original(*args, **kwargs)
    finally:
        _LAYER_NOTES.reset(token)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """A norm of a class in :data:`LLAMA_RMS_NORMS` with its weight and epsilon."""
    return (type(module).__name__ in LLAMA_RMS_NORMS
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and hasattr(module, "variance_epsilon"))


def _owns_norm(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return (not isinstance(module, PreTrainedModel)
            and any(is_llama_rms_norm(child) for child in module.children()))


def recompute_norm_outputs(model: nn.Module) -> int:
    """Route the Llama-style RMSNorms of ``model`` and the layers owning them; returns how
    many layers (idempotent). Parameters and state dict are unchanged."""
    route_forwards(model, is_llama_rms_norm, _norm_forward, _ORIGINAL_NORM)
    return route_forwards(model, _owns_norm, _layer_forward, _ORIGINAL_LAYER)
