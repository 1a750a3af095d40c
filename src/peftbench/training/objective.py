"""Per-token negative log-likelihood of the target tokens: the training loss and the scores
used to rank label verbalizers share this one function.

Decoder-only models compute the vocabulary projection only at the positions that predict a
target token (not over the whole prompt): the final hidden states are gathered there and
passed through the output embedding. :func:`supports_gathered_logits` checks once per model
that this equals the model's own logits, and the full-logits path is used otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.training.encoding import IGNORE


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor], encoder_decoder: bool,
              gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll per target token, row index of each token) for a right-padded batch."""
    labels = batch["labels"]
    if encoder_decoder:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels).logits
        mask = labels != IGNORE
        selected, targets = logits[mask], labels[mask]
    else:
        targets_all = labels[:, 1:]
        mask = targets_all != IGNORE
        if gather:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, logits_to_keep=last_position(labels))
            hidden = out.hidden_states[-1][:, -labels.shape[1]:]  # drop soft-prompt positions
            selected = model.get_output_embeddings()(hidden[:, :-1][mask])
        else:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            selected = logits[:, -labels.shape[1]:][:, :-1][mask]
        targets = targets_all[mask]
    rows = mask.nonzero()[:, 0]
    nll = F.cross_entropy(selected.float(), targets, reduction="none")
    return nll, rows


def last_position(like: torch.Tensor) -> torch.Tensor:
    """``logits_to_keep`` for the last position only, as an index tensor: an int slice hands
    the LM head a non-contiguous input, and torch then copies the whole output embedding
    once per row (about 1 GB per SmolLM2 batch)."""
    return torch.tensor([-1], device=like.device)


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor], encoder_decoder: bool,
              gather: bool = True) -> torch.Tensor:
    """Mean NLL over all target tokens of the batch (what Hugging Face models return)."""
    nll, _ = token_nll(model, batch, encoder_decoder, gather)
    return nll.mean()


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], encoder_decoder: bool,
                      gather: bool = True) -> torch.Tensor:
    """Sum of target-token log-probabilities, one value per row."""
    nll, rows = token_nll(model, batch, encoder_decoder, gather)
    totals = torch.zeros(batch["labels"].shape[0], dtype=nll.dtype, device=nll.device)
    return -totals.index_add_(0, rows, nll)


@torch.no_grad()
def supports_gathered_logits(model: nn.Module, batch: dict[str, torch.Tensor],
                             autocast: Callable[[], AbstractContextManager] = nullcontext) -> bool:
    """True if gathering final hidden states reproduces a decoder model's own logits."""
    if model.get_output_embeddings() is None:
        return False
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same function
    try:
        with autocast():
            fast = token_nll(model, batch, encoder_decoder=False, gather=True)[0]
            slow = token_nll(model, batch, encoder_decoder=False, gather=False)[0]
    except (TypeError, ValueError, AttributeError, IndexError):
        return False
    finally:
        model.train(was_training)
    tolerance = 1e-3 if fast.dtype == torch.float32 and not _is_bf16(model) else 5e-2
    return bool(torch.allclose(fast, slow, rtol=tolerance, atol=tolerance))


def _is_bf16(model: nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())
