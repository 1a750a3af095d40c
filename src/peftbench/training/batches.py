"""Training batches: a seeded shuffle per epoch, grouped by length to waste few pad tokens,
the largest batch of the run first."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from peftbench.training.encoding import Encoded

_GROUP = 32  # batches per length-sorted window


def batch_order(examples: Sequence[Encoded], batch_size: int, epoch: int,
                seed: int) -> list[list[int]]:
    """Indices of one epoch's batches: :func:`grouped_batches`, the first epoch starting with
    its widest batch (the one needing the most memory).

    The Trainer's length-grouped sampler does the same: the memory a step needs is then
    taken once, at the first step, and every later step fits into it. Started anywhere else,
    the widest batch finds the memory freed by smaller steps cut into pieces too small for
    it and takes more, and backing new pages is slow (``benchmarks/README.md``): on SmolLM2
    (all-linear LoRA and full fine-tuning, fp32) peak RSS fell by 7 % and 16 %.
    """
    ordered = grouped_batches(examples, batch_size, epoch, seed)
    if epoch == 0 and ordered:
        widest = max(range(len(ordered)), key=lambda b: _memory_key(examples, ordered[b]))
        ordered.insert(0, ordered.pop(widest))
    return ordered


def grouped_batches(examples: Sequence[Encoded], batch_size: int, epoch: int,
                    seed: int) -> list[list[int]]:
    """The epoch shuffled with ``seed + epoch``; within windows of ``_GROUP`` batches the
    examples are sorted by length, cut into batches, and the batches shuffled again, so a
    batch holds similar lengths while the order stays random."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = batch_size * _GROUP
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].input_ids))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _memory_key(examples: Sequence[Encoded], batch: list[int]) -> tuple[int, int]:
    """Padded size of a batch (rows x (longest input + longest labels): decoder-only and
    encoder-decoder alike), then its rows: what its step allocates."""
    width = (max(len(examples[i].input_ids) for i in batch)
             + max(len(examples[i].labels) for i in batch))
    return width * len(batch), len(batch)


def endless_batches(examples: Sequence[Encoded], batch_size: int,
                    seed: int) -> Iterator[list[Encoded]]:
    """Batches over as many epochs as the caller consumes."""
    epoch = 0
    while True:
        for indices in batch_order(examples, batch_size, epoch, seed):
            yield [examples[i] for i in indices]
        epoch += 1
