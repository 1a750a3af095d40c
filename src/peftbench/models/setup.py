"""Conventions every loaded model and tokenizer share, whatever their source."""

from __future__ import annotations

import logging
from typing import Any, Literal

from peftbench.errors import UsageError

log = logging.getLogger(__name__)

Family = Literal["encoder-decoder", "decoder-only"]


def model_family(model: Any) -> Family:
    """``"encoder-decoder"`` (T5-like) or ``"decoder-only"`` (Llama-like)."""
    return "encoder-decoder" if getattr(model.config, "is_encoder_decoder", False) else (
        "decoder-only"
    )


def without_hub_kernels(model: Any) -> None:
    """Keep ``model`` on its own PyTorch forwards, without Hugging Face Hub kernels.

    transformers 5 loads models with ``use_kernels`` on whenever the ``kernels`` package is
    installed: layers declared for Hub kernels (Llama's RMSNorm, its rotary embedding) are
    then kernelized again at every ``train()`` / ``eval()`` switch. That fetches kernels
    when the Hub is reachable, so a result would depend on the network, and each switch
    resets the forward set on the module itself, undoing peftbench's fused layers (the
    placement's record would claim them while the torch forward ran).
    """
    if getattr(model, "use_kernels", False):
        model.use_kernels = False  # transformers reverts every layer to its torch forward


def prepare(model: Any, tokenizer: Any, name: str) -> None:
    """Give the tokenizer a pad token, pad on the right, tell the model the pad id, and keep
    the model off Hub kernels (:func:`without_hub_kernels`).

    A tokenizer without a pad token gets ``pad = eos`` (logged as a warning). Padding is
    right-sided for every model; code that generates with a decoder-only model pads on the
    left itself.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(
                f"model '{name}': its tokenizer has neither a pad nor an eos token, so "
                "batches cannot be padded; give the tokenizer a pad token and save it again."
            )
        log.warning("model '%s': tokenizer has no pad token; using eos %r (id %d) as pad",
                    name, tokenizer.eos_token, tokenizer.eos_token_id)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.to("cpu")
    without_hub_kernels(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
