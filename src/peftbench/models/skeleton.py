"""A model's modules without its weights: what a method is applied to in checks before a
sweep (module names, layer counts), in a fraction of a second and no memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.models.registry import resolve_model_kind


def model_config(name: str) -> Any:
    """The transformers config of model ``name`` (SmolLM2, a folder or a Hub id that
    :func:`~peftbench.models.check_model` accepts), without loading weights; a Hub id is
    read from the local cache, else from the Hub."""
    from transformers import AutoConfig

    if name == "smollm2-135m":
        from peftbench.models.smollm2 import ensure_checkpoint

        folder, _ = ensure_checkpoint()
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    if resolve_model_kind(name) == "local":
        return AutoConfig.from_pretrained(Path(name).expanduser(), local_files_only=True)
    from peftbench.models.hub import cached_snapshot

    snapshot = cached_snapshot(name)
    return AutoConfig.from_pretrained(snapshot or name, local_files_only=snapshot is not None)


def skeleton(name: str) -> tuple[nn.Module, bool]:
    """``(model, is_encoder_decoder)``: model ``name`` with its weights on the meta device
    (the tiny built-ins: the real, tiny model)."""
    if name in ("tiny-random-t5", "tiny-random-llama"):
        from peftbench.models.tiny import load_tiny

        loaded = load_tiny(name)
        return loaded.model, loaded.is_encoder_decoder
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = model_config(name)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return model, bool(config.is_encoder_decoder)
