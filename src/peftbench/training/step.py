"""The optimizer and one optimizer step: shared by the training loop and the benchmark.

Keeping them in one place means ``benchmarks/throughput.py`` times exactly the step that
``training/loop.py`` runs, not a copy of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from peftbench.config import RunSpec
from peftbench.training.encoding import Encoded, collate, to_device
from peftbench.training.objective import mean_loss

Batch = dict[str, torch.Tensor]


def warmup_steps(spec: RunSpec, total_steps: int) -> int:
    """Linear LR warm-up: ``ceil(warmup_ratio * total_steps)`` steps."""
    return math.ceil(spec.warmup_ratio * total_steps)


@dataclass
class Optimization:
    """Trainable parameters, AdamW over them and its warm-up + linear-decay schedule."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_optimization(model: nn.Module, lr: float, spec: RunSpec,
                       total_steps: int) -> Optimization:
    """Fused AdamW (one kernel over all parameters; the default loops tensor by tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(spec, total_steps),
                                                total_steps)
    return Optimization(params, optimizer, scheduler)


@dataclass
class StepResult:
    loss: float
    samples: int
    tokens: int


def _no_phase(_name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def train_step(model: nn.Module, batches: Iterator[Sequence[Encoded]], pad_id: int,
               spec: RunSpec, opt: Optimization, device: torch.device,
               autocast: Callable[[], AbstractContextManager], encoder_decoder: bool,
               gather: bool, *, on_batch: Callable[[Batch], None] | None = None,
               phase: Callable[[str], AbstractContextManager] = _no_phase) -> StepResult:
    """``grad_accum`` micro-batches forward and backward, clip, AdamW step, schedule.

    ``on_batch`` sees each collated micro-batch, still on the CPU (the benchmark counts its
    tokens; counting on a GPU would wait for the device);
    ``phase(name)`` wraps the data / forward / backward / optimizer parts (profiler labels).
    The loss is returned as is: the caller decides what a non-finite loss means.
    """
    loss_sum, samples, tokens = 0.0, 0, 0
    for _ in range(spec.grad_accum):
        with phase("data"):
            micro = next(batches)
            collated = collate(micro, pad_id)
            batch = to_device(collated, device)
        with phase("forward"), autocast():
            loss = mean_loss(model, batch, encoder_decoder, gather) / spec.grad_accum
        with phase("backward"):
            loss.backward()
        loss_sum += loss.item()
        samples += len(micro)
        tokens += int(collated["attention_mask"].sum())
        if on_batch is not None:
            on_batch(collated)
    if math.isfinite(loss_sum):
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(opt.params, spec.max_grad_norm)
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, samples, tokens)
