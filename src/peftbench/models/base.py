"""A loaded base model with its tokenizer and provenance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedModel:
    """A base model ready for a method to wrap.

    ``fingerprint`` is a sha256 over the weight files (or, for tiny random models, over the
    config and seed); ``pretrained`` is False for randomly initialised test models.
    """

    name: str
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    is_encoder_decoder: bool
    pretrained: bool
    fingerprint: str
    source: str
