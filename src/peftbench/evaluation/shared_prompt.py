"""Rank label verbalizers with one pass over each prompt.

Scoring K labels naively runs K sequences ``prompt + label``: the prompt, usually most of the
tokens, is computed K times. Here the prompt runs once:

- decoder-only: the left-padded prompts fill the KV cache; the cache is repeated K times and
  only the label tokens are run on top of it (explicit position ids keep every token at the
  position it has in the plain ``prompt + label`` sequence);
- encoder-decoder: the encoder runs once and its output is repeated for the K decoder passes.

The scores equal the naive ones (tests check it). Decoder-only soft-prompt (prompt tuning)
models put their virtual tokens into the cache in front of the prompt
(:func:`soft_prompt_prefill`) and score the labels with the base model on top of it;
encoder-decoder soft-prompt models use the naive path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.training.encoding import IGNORE, left_pad
from peftbench.training.objective import last_position


def is_prompt_learning(model: nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def cache_argument(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older), as the model takes it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_argument_of(type(base))


@functools.cache
def _cache_argument_of(model_class: type) -> str:  # once per class, not per eval batch
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def soft_prompt_prefill(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run a decoder-only prompt-tuning model's virtual tokens and the left-padded prompts
    through its base model once, filling the KV cache: (output with the last position's
    logits, mask over virtual + prompt tokens, their position ids). Positions follow the
    mask, so a left-padded row sees what it sees alone (virtual tokens at 0..V-1, as in
    training, where peft prepends them to right-padded rows)."""
    rows = input_ids.shape[0]
    soft = model.get_prompt(batch_size=rows)
    embeds = model.word_embeddings(input_ids)
    inputs = torch.cat([soft.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(rows, soft.shape[1]), attention_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.get_base_model()(inputs_embeds=inputs, attention_mask=mask,
                                 position_ids=positions, use_cache=True,
                                 logits_to_keep=last_position(mask))
    return out, mask, positions


def _label_matrix(label_ids: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(K, L) label ids padded with ``pad_id`` and the (K, L) mask of real label tokens."""
    width = max(len(ids) for ids in label_ids)
    ids = torch.full((len(label_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(label_ids), width), dtype=torch.bool)
    for k, tokens in enumerate(label_ids):
        ids[k, : len(tokens)] = torch.tensor(tokens)
        mask[k, : len(tokens)] = True
    return ids, mask


def decoder_scores(model: nn.Module, prompts: Sequence[list[int]],
                   label_ids: Sequence[list[int]], pad_id: int,
                   device: torch.device) -> torch.Tensor:
    """(B, K) summed log-probabilities of each label after each prompt, decoder-only model."""
    batch = {k: v.to(device) for k, v in left_pad(prompts, pad_id).items()}
    n, k = len(prompts), len(label_ids)
    if is_prompt_learning(model):
        out, prompt_mask, _ = soft_prompt_prefill(model, batch["input_ids"],
                                                  batch["attention_mask"])
        model = model.get_base_model()  # the labels follow the cache, no second soft prompt
    else:
        prompt_mask = batch["attention_mask"]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=batch["input_ids"], attention_mask=prompt_mask,
                    position_ids=positions, use_cache=True,
                    logits_to_keep=last_position(prompt_mask))
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts label token 0
    labels, label_mask = (t.to(device) for t in _label_matrix(label_ids, pad_id))
    scores = first[:, labels[:, 0]]  # (B, K)
    if labels.shape[1] == 1:
        return scores
    # transformers 5.2x renamed past_key_values to cache; reading the old name warns (and
    # .get with a default would read it eagerly)
    cache = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401
    cache.batch_repeat_interleave(k)
    follow = labels[:, :-1].repeat(n, 1)  # (B*K, L-1): inputs that predict tokens 1..L-1
    follow_mask = label_mask[:, :-1].repeat(n, 1).long()
    lengths = prompt_mask.sum(-1).repeat_interleave(k)
    follow_positions = lengths[:, None] + torch.arange(follow.shape[1], device=device)
    attention = torch.cat([prompt_mask.repeat_interleave(k, dim=0), follow_mask], dim=1)
    logits = model(input_ids=follow, attention_mask=attention, position_ids=follow_positions,
                   use_cache=False, **{cache_argument(model): cache}).logits
    targets = labels[:, 1:].repeat(n, 1).masked_fill(~label_mask[:, 1:].repeat(n, 1), IGNORE)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                          reduction="none")
    return scores - nll.sum(dim=1).view(n, k)


def encoder_decoder_scores(model: nn.Module, prompts: Sequence[list[int]],
                           label_ids: Sequence[list[int]], pad_id: int,
                           device: torch.device) -> torch.Tensor:
    """(B, K) summed log-probabilities of each label, encoder run once per prompt."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    n, k = len(prompts), len(label_ids)
    encoder_out = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
    encoder_out.last_hidden_state = encoder_out.last_hidden_state.repeat_interleave(k, dim=0)
    labels, label_mask = (t.to(device) for t in _label_matrix(label_ids, pad_id))
    targets = labels.masked_fill(~label_mask, IGNORE).repeat(n, 1)
    logits = model(encoder_outputs=encoder_out, attention_mask=mask.repeat_interleave(k, dim=0),
                   labels=targets).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                          reduction="none")
    return -nll.sum(dim=1).view(n, k)
