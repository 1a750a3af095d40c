"""Scoring a model: rank classification by label log-likelihood, batched greedy generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from peftbench.evaluation import shared_prompt
from peftbench.evaluation.soft_prompt import greedy_generate
from peftbench.tasks.base import Example
from peftbench.training.encoding import Encoded, TextEncoder, collate, left_pad
from peftbench.training.objective import sequence_logprobs

Autocast = Callable[[], AbstractContextManager]


def _by_length(items: Sequence[list[int]]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: len(items[i]))


@torch.no_grad()
def rank_classify(model: nn.Module, encoder: TextEncoder, prompts: Sequence[list[int]],
                  labels: Sequence[str], batch_size: int, device: torch.device,
                  autocast: Autocast, gather: bool = False) -> list[int]:
    """Index of the most likely label verbalizer for each prompt.

    Each prompt is computed once and shared by its K labels (:mod:`shared_prompt`), except
    for encoder-decoder soft-prompt models, which score the K ``prompt + label`` sequences
    separately.
    """
    label_ids = [encoder.target_ids(label) for label in labels]
    shared = not (encoder.encoder_decoder and shared_prompt.is_prompt_learning(model))
    per_batch = batch_size if shared else max(1, batch_size // len(labels))
    order = _by_length(prompts)
    predictions = [0] * len(prompts)
    for start in range(0, len(order), per_batch):
        rows = order[start:start + per_batch]
        with autocast():
            if shared:
                score = (shared_prompt.encoder_decoder_scores if encoder.encoder_decoder
                         else shared_prompt.decoder_scores)
                scores = score(model, [prompts[i] for i in rows], label_ids, encoder.pad_id,
                               device)
            else:
                pairs: list[Encoded] = [encoder.encode_ids(prompts[i], ids)
                                        for i in rows for ids in label_ids]
                batch = {k: v.to(device) for k, v in collate(pairs, encoder.pad_id).items()}
                scores = sequence_logprobs(model, batch, encoder.encoder_decoder, gather)
        best = scores.view(len(rows), len(labels)).argmax(dim=1).tolist()
        for row, choice in zip(rows, best, strict=True):
            predictions[row] = choice
    return predictions


@torch.no_grad()
def generate(model: nn.Module, encoder: TextEncoder, prompts: Sequence[list[int]],
             batch_size: int, max_new_tokens: int, device: torch.device,
             autocast: Autocast) -> list[str]:
    """Greedy decoding (KV cache on), batched by similar prompt length."""
    tokenizer = encoder.tokenizer
    soft_prompt = not encoder.encoder_decoder and shared_prompt.is_prompt_learning(model)
    order = _by_length(prompts)
    outputs = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if encoder.encoder_decoder:
            batch = collate([Encoded(prompts[i], [encoder.pad_id]) for i in rows], encoder.pad_id)
            batch.pop("labels")
        else:
            batch = left_pad([prompts[i] for i in rows], encoder.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            if soft_prompt:  # peft's generate re-inserts the soft prompt at every step
                generated = greedy_generate(model, batch["input_ids"], batch["attention_mask"],
                                            max_new_tokens, encoder.eos_id, encoder.pad_id)
            else:
                generated = model.generate(**batch, max_new_tokens=max_new_tokens,
                                           do_sample=False, num_beams=1,
                                           pad_token_id=encoder.pad_id,
                                           eos_token_id=encoder.eos_id)
        if not encoder.encoder_decoder and not soft_prompt:
            generated = generated[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for row, text in zip(rows, texts, strict=True):
            outputs[row] = text.strip()
    return outputs


def prompts_of(encoder: TextEncoder, examples: Sequence[Example]) -> list[list[int]]:
    return encoder.prompt_ids_many([example.input for example in examples])
