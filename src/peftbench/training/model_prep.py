"""From a loaded base model to the model that trains: shared by the loop and the benchmark."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from transformers import set_seed

from peftbench.config import RunSpec
from peftbench.methods import get_method
from peftbench.methods.base import Method
from peftbench.models.base import LoadedModel
from peftbench.training.dropout import use_fast_dropout
from peftbench.training.encoding import Encoded, collate, to_device
from peftbench.training.objective import supports_gathered_logits
from peftbench.training.precision import (
    copy_out_of_checkpoint,
    lora_inputs_uncast,
    store_frozen_in_bf16,
)


def attach_method(spec: RunSpec, loaded: LoadedModel) -> tuple[Method, dict[str, Any], nn.Module]:
    """The method's resolved arguments and the adapted model, seeded just before it is built."""
    method = get_method(spec.method)
    args = method.resolve_args(spec.method_args)
    set_seed(spec.seed)
    model = method.apply(loaded.model, args, encoder_decoder=loaded.is_encoder_decoder)
    return method, args, model


def place_for_training(model: nn.Module, spec: RunSpec, device: torch.device) -> None:
    """Move to ``device``. bf16 mode is the fast path: frozen matrices stored in bf16 once,
    LoRA inputs not copied to fp32 and, on CPU, the checkpoint file's mapping released and
    dropout with cheap masks (:mod:`~peftbench.training.dropout`). fp32 mode changes
    nothing: it is the exact reference that must match a plain Hugging Face run step for
    step."""
    model.to(device)
    if spec.precision == "bf16":
        store_frozen_in_bf16(model)
        lora_inputs_uncast(model)
        if device.type == "cpu":
            copy_out_of_checkpoint(model)
            use_fast_dropout(model)


def forward_for_training(model: nn.Module, spec: RunSpec) -> nn.Module:
    """The module the training step calls: ``model`` itself, or with ``spec.compile`` a
    ``torch.compile`` wrapper sharing its parameters (dynamic shapes: batches vary in
    length). Evaluation keeps calling ``model``: generation's shapes would recompile."""
    if not spec.compile:
        return model
    return torch.compile(model, dynamic=True)


def use_gathered_logits(model: nn.Module, train_set: Sequence[Encoded], pad_id: int,
                        device: torch.device, autocast: Callable[[], AbstractContextManager],
                        encoder_decoder: bool) -> bool:
    """Whether the LM head may run at target positions only (decoder models that allow it)."""
    if encoder_decoder:
        return False
    probe = to_device(collate(train_set[:4], pad_id), device)
    return supports_gathered_logits(model, probe, autocast)
