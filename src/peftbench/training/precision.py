"""Mixed precision done once: frozen matrices stored in bf16, everything else fp32.

Under bf16 autocast every matmul runs in bf16 anyway; storing the frozen base weight
matrices in bf16 removes the per-step re-cast of the whole model and halves its memory.
Trainable parameters (and so AdamW's state) stay fp32 for exact accumulation of small
updates. Frozen vectors (norm weights, biases) stay fp32: they are tiny, and the norms
compute in fp32. The input embedding's output is returned in fp32, so the residual stream
is fp32 exactly as under plain autocast with fp32 weights (Trainer ``bf16=True``): with a
bf16 embedding table the whole residual stream would otherwise run in bf16, which moved
the first losses about twice as far from fp32 as standard mixed precision does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_HOOK_ATTRIBUTE = "_peftbench_fp32_embedding_hook"


def _output_to_fp32(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16:
        return output.float()
    return output


def embeddings_output_fp32(model: nn.Module) -> None:
    """Make every embedding table return fp32 (idempotent).

    All of them, not only ``get_input_embeddings()``: T5's encoder and decoder hold their
    own modules sharing one table, and its relative position bias is an embedding too.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding) and not hasattr(module, _HOOK_ATTRIBUTE):
            setattr(module, _HOOK_ATTRIBUTE, module.register_forward_hook(_output_to_fp32))


def store_frozen_in_bf16(model: nn.Module) -> int:
    """Cast frozen floating-point matrices to bf16 in place; returns how many elements."""
    cast = 0
    for param in model.parameters():
        if (not param.requires_grad and param.is_floating_point() and param.dim() >= 2
                and param.dtype != torch.bfloat16):
            param.data = param.data.to(torch.bfloat16)
            cast += param.numel()
    embeddings_output_fp32(model)
    return cast


def copy_out_of_checkpoint(model: nn.Module) -> int:
    """Give every parameter and buffer that is not bf16 its own memory; returns how many.

    transformers memory-maps safetensors checkpoints. After :func:`store_frozen_in_bf16`
    the fp32 matrices are gone, but the fp32 tensors left (norm weights, trainable
    parameters) still point into the mapping, which keeps every page the cast read
    resident: 513 MB of SmolLM2's file stayed in the process's RSS for the whole run.
    Copies of those tensors let the mapping go.
    """
    copied = 0
    for param in model.parameters():
        if param.dtype != torch.bfloat16:
            param.data = param.data.clone()
            copied += 1
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.dtype != torch.bfloat16:
                module._buffers[name] = buffer.clone()
                copied += 1
    return copied


def lora_inputs_uncast(model: nn.Module) -> int:
    """Stop LoRA layers from copying a bf16 input to fp32 before the adapter; returns how many.

    peft casts a layer's input to the adapter weights' dtype (fp32 here) before dropout and
    ``lora_A``; under bf16 autocast ``lora_A`` casts it straight back to bf16, so that is two
    copies and an fp32 activation kept for the backward per adapted layer, for nothing. Only
    for use under autocast (bf16 mode), where the adapter's matmuls run in bf16 either way.
    """
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
