"""Evaluate a model on a fixed split: predictions, then the task's metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftbench.evaluation import scoring
from peftbench.evaluation.metrics import classification_metrics, generation_metrics
from peftbench.tasks.base import Example, TaskSpec
from peftbench.training.encoding import TextEncoder


class Evaluator:
    """Scores one split; prompts are tokenised once and reused at every validation."""

    def __init__(self, spec: TaskSpec, encoder: TextEncoder, examples: Sequence[Example],
                 device: torch.device, autocast: scoring.Autocast, batch_size: int,
                 max_new_tokens: int, gather: bool = False) -> None:
        self.spec = spec
        self.encoder = encoder
        self.examples = list(examples)
        self.prompts = scoring.prompts_of(encoder, self.examples)
        self.device = device
        self.autocast = autocast
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.gather = gather

    def predict(self, model: nn.Module) -> list[Any]:
        was_training = model.training
        model.eval()
        try:
            if self.spec.type == "classification":
                return scoring.rank_classify(model, self.encoder, self.prompts, self.spec.labels,
                                             self.batch_size, self.device, self.autocast,
                                             self.gather)
            return scoring.generate(model, self.encoder, self.prompts, self.batch_size,
                                    self.max_new_tokens, self.device, self.autocast)
        finally:
            model.train(was_training)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """All metrics of the task on this split (0-100), ``primary`` names the main one."""
        predictions = self.predict(model)
        if self.spec.type == "classification":
            labels = [example.label for example in self.examples]
            scores: dict[str, Any] = classification_metrics(predictions, labels)
        else:
            scores = generation_metrics(predictions, [e.refs for e in self.examples])
        scores["primary"] = self.spec.primary_metric
        scores["n"] = len(self.examples)
        return scores
