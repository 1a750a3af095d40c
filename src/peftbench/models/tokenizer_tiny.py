"""A small byte-level BPE tokenizer for the tiny random test models, built locally.

Trained deterministically on :data:`TINY_CORPUS` (nothing is downloaded). Byte-level means
any text, in any script, still encodes (rare characters become several byte tokens) and
decodes back exactly.

Special tokens (the same ids in both flavours)::

    id 0 <pad>   id 1 </s>   id 2 <unk>   id 3 <s>

* ``"t5"``: pad 0, eos 1, unk 2 (T5 conventions); no bos.
* ``"llama"``: bos 3, eos 1, pad 0, unk 2 (all distinct, like SmolLM2 bos/eos).

Neither flavour adds special tokens on its own: ``tokenizer("hi").input_ids`` holds only the
text's tokens. (Real T5 tokenizers append ``</s>``; here the trainer appends eos ids itself.)
Padding side is right.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peftbench.models.tiny_corpus import TINY_CORPUS

Flavour = Literal["t5", "llama"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")
TARGET_VOCAB_SIZE = 1024


@lru_cache(maxsize=1)
def _trained_json() -> str:
    """Train the BPE once per process and return its serialised form."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(flavour: Flavour) -> PreTrainedTokenizerFast:
    """A fresh ``PreTrainedTokenizerFast`` for the tiny ``"t5"`` or ``"llama"`` model."""
    if flavour not in ("t5", "llama"):
        raise ValueError(f"flavour must be 't5' or 'llama', not {flavour!r}")
    backend = Tokenizer.from_str(_trained_json())
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if flavour == "llama":
        specials["bos_token"] = "<s>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        **specials,
    )
    return tokenizer


def tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 over the vocabulary and merges (stable across processes)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    payload = json.dumps(
        {"vocab": state["model"]["vocab"], "merges": state["model"]["merges"],
         "added": [t["content"] for t in state["added_tokens"]]},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()
