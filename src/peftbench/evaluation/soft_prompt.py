"""Greedy decoding for decoder-only soft-prompt (prompt tuning) models.

peft 0.21's ``generate`` for prompt learning looks for the KV cache under the keyword
``past_key_values``; transformers >= 5.2x passes it as ``cache``. peft then takes every
decoding step for the first one and prepends the virtual tokens again: each new token is
computed after another copy of the soft prompt in the cache (20 extra positions per step for
SmolLM2), which is both wrong and 3x slower. This loop does what peft intends: the soft
prompt and the left-padded prompt fill the cache once, then one token per step. Position
ids follow the attention mask, so a left-padded row sees the positions it has alone (and
the soft prompt positions 0..V-1, as in training).
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.evaluation.shared_prompt import cache_argument, soft_prompt_prefill
from peftbench.training.objective import last_position


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """(B, <= max_new_tokens) new tokens; rows that ended with ``eos_id`` are padded."""
    base = model.get_base_model()
    rows = input_ids.shape[0]
    out, mask, positions = soft_prompt_prefill(model, input_ids, attention_mask)
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = base(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                   use_cache=True, logits_to_keep=last_position(mask),
                   **{cache_argument(model): out.past_key_values})
    return torch.stack(tokens, dim=1)
