"""Training batches: a seeded shuffle per epoch, grouped by length to waste few pad tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from peftbench.training.encoding import Encoded

_GROUP = 32  # batches per length-sorted window


def batch_order(examples: Sequence[Encoded], batch_size: int, epoch: int,
                seed: int) -> list[list[int]]:
    """Indices of one epoch's batches.

    The epoch is shuffled with ``seed + epoch``; within windows of ``_GROUP`` batches the
    examples are sorted by length, cut into batches, and the batches shuffled again, so a
    batch holds similar lengths while the order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = batch_size * _GROUP
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].input_ids))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def endless_batches(examples: Sequence[Encoded], batch_size: int,
                    seed: int) -> Iterator[list[Encoded]]:
    """Batches over as many epochs as the caller consumes."""
    epoch = 0
    while True:
        for indices in batch_order(examples, batch_size, epoch, seed):
            yield [examples[i] for i in indices]
        epoch += 1
