"""Text -> token ids for training and scoring, one convention for every model family.

- Decoder-only: ``prompt + " " + target + eos``; the loss is masked on the prompt.
- Encoder-decoder: encoder gets the prompt (tokenizer's own special tokens), the decoder
  learns ``target + eos``.
- A prompt longer than ``max_source_length`` keeps its head and its last 16 tokens, so the
  template's closing cue ("Answer:") survives truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftbench.training.token_cache import TokenCache

IGNORE = -100
_TAIL = 16
ENCODING = 1  # bump when prompt/target ids change for the same text (part of the cache key)


@dataclass(frozen=True)
class Encoded:
    """One example as ids: ``input_ids`` (decoder: prompt+target) and ``labels``."""

    input_ids: list[int]
    labels: list[int]


class TextEncoder:
    """Tokenises prompts and targets for one model family.

    The ``*_many`` methods tokenise a whole list in one call, through ``cache`` (a
    :class:`~peftbench.training.token_cache.TokenCache`; default: none, nothing stored).
    """

    def __init__(self, tokenizer, encoder_decoder: bool, max_source_length: int,
                 max_target_length: int, cache: TokenCache | None = None) -> None:
        self.tokenizer = tokenizer
        self.cache = cache if cache is not None else TokenCache(None, tokenizer)
        self.encoder_decoder = encoder_decoder
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def prompt_ids(self, text: str) -> list[int]:
        return self._prompts([text])[0]

    def target_ids(self, text: str) -> list[int]:
        return self._targets([text])[0]

    def encode(self, prompt: str, target: str) -> Encoded:
        return self.encode_ids(self.prompt_ids(prompt), self.target_ids(target))

    def prompt_ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        kind = f"prompt:v{ENCODING}:max={self.max_source_length}:tail={_TAIL}"
        return self.cache.ids(kind, texts, self._prompts)

    def target_ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        family = "encoder-decoder" if self.encoder_decoder else "decoder"
        kind = f"target:v{ENCODING}:{family}:max={self.max_target_length}:eos={self.eos_id}"
        return self.cache.ids(kind, texts, self._targets)

    def encode_many(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        """``encode`` for every (prompt, target) pair."""
        prompts = self.prompt_ids_many([p for p, _ in pairs])
        targets = self.target_ids_many([t for _, t in pairs])
        return [self.encode_ids(p, t) for p, t in zip(prompts, targets, strict=True)]

    def _prompts(self, texts: list[str]) -> list[list[int]]:
        rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        limit = self.max_source_length
        return [ids[: limit - _TAIL] + ids[-_TAIL:] if len(ids) > limit else ids for ids in rows]

    def _targets(self, texts: list[str]) -> list[list[int]]:
        if not self.encoder_decoder:
            texts = [" " + text for text in texts]
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[*ids[: self.max_target_length - 1], self.eos_id] for ids in rows]

    def encode_ids(self, prompt: list[int], target: list[int]) -> Encoded:
        if self.encoder_decoder:
            return Encoded(prompt, target)
        return Encoded(prompt + target, [IGNORE] * len(prompt) + target)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its own longest sequence (dynamic padding)."""
    width = max(len(e.input_ids) for e in batch)
    label_width = max(len(e.labels) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), label_width), IGNORE, dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention[row, : len(example.input_ids)] = 1
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad prompts on the left (decoder-only generation continues from the right edge)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}
