"""``peftbench recommend``: the decision framework applied to a new task.

The evidence is the bucket (task type, scale of the new train size). When nothing was
measured at that scale, the measured train size nearest in log scale stands in
(extrapolated). Confidence:

* **high**: the train size lies within the measured range of that task type, the bucket is
  at its own scale, every evidence cell has >= 2 seeds, >= 2 tasks of the type were
  measured and the recommended method is tied with the best (within the tolerance) in
  every case;
* **low**: the train size lies outside the measured range (extrapolated) or the evidence
  has a single seed;
* **medium**: otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftbench.analysis.decision import Decision, DecisionConfig, MethodSummary, decide
from peftbench.analysis.records import Cell, Stat
from peftbench.errors import UsageError

TASK_TYPES = ("classification", "generation")


@dataclass
class Evidence:
    """One measured case behind a recommendation."""

    model: str
    task: str
    train_size: int
    metric: str | None
    score: Stat  # the recommended method's
    best_method: str
    best_score: Stat
    full_score: Stat | None
    trainable: float | None
    train_seconds: float | None
    memory_mb: float | None
    tied_with_best: bool


@dataclass
class Recommendation:
    task_type: str
    train_size: int
    scale: str
    decision: Decision
    method: str | None
    method_args: dict[str, Any]
    resolved_args: dict[str, Any]
    lr: float | None
    evidence: list[Evidence]
    confidence: str
    confidence_reasons: list[str] = field(default_factory=list)
    measured_sizes: list[int] = field(default_factory=list)
    evidence_sizes: list[int] = field(default_factory=list)


def _log_distance(a: int, b: int) -> float:
    return abs(math.log(a) - math.log(b))


def _configuration(summary: MethodSummary, train_size: int) -> Cell:
    """The evidence cell nearest the train size: its method arguments and learning rate."""
    return min(summary.cells, key=lambda c: (_log_distance(c.key.train_size, train_size),
                                             -c.score.n, c.key.task))


def _evidence(decision: Decision, cells: list[Cell], method: str) -> list[Evidence]:
    rows = []
    for model, task, size in decision.cases:
        case = [c for c in cells if (c.key.model, c.key.task, c.key.train_size)
                == (model, task, size) and c.score.mean is not None]
        ours = next((c for c in case if c.key.method == method), None)
        if ours is None or not case:
            continue
        best = max(case, key=lambda c: c.score.mean or 0.0)
        full = next((c for c in case if c.key.method == "full"), None)
        gap = (best.score.mean or 0.0) - (ours.score.mean or 0.0)
        rows.append(Evidence(model, task, size, ours.metric, ours.score, best.key.method,
                             best.score, full.score if full else None,
                             ours.stats["trainable"].mean, ours.stats["train_seconds"].mean,
                             ours.stats["memory_mb"].mean, gap <= decision.tolerance + 1e-9))
    return rows


def recommend(cells: list[Cell], task_type: str, train_size: int,
              config: DecisionConfig) -> Recommendation:
    """The recommended method (with configuration, evidence, confidence) for a new task."""
    if task_type not in TASK_TYPES:
        raise UsageError(f"--task-type {task_type!r}: choose one of {', '.join(TASK_TYPES)}.")
    if train_size < 1:
        raise UsageError(f"--train-size {train_size}: must be at least 1.")
    typed = [c for c in cells if c.task_type == task_type and c.score.mean is not None]
    if not typed:
        measured = sorted({c.task_type for c in cells}) or ["none"]
        raise UsageError(f"--task-type {task_type}: no results for this task type "
                         f"(measured: {', '.join(measured)}).")
    scale = config.scales.of(train_size)
    sizes = sorted({c.key.train_size for c in typed})
    bucket = [c for c in typed if config.scales.of(c.key.train_size) == scale]
    at_scale = bool(bucket)
    if not at_scale:
        nearest = min(sizes, key=lambda s: (_log_distance(s, train_size), s))
        bucket = [c for c in typed if c.key.train_size == nearest]
    decision = decide(bucket, task_type, scale, config)
    rec = decision.recommended
    chosen = _configuration(rec, train_size) if rec else None
    evidence = _evidence(decision, bucket, rec.method) if rec else []
    confidence, reasons = _confidence(train_size, sizes, at_scale, bucket, evidence, typed)
    return Recommendation(task_type, train_size, scale, decision, rec.method if rec else None,
                          chosen.method_args if chosen else {},
                          chosen.resolved_args if chosen else {},
                          chosen.lr if chosen else None, evidence, confidence, reasons, sizes,
                          sorted({c.key.train_size for c in bucket}))


def _confidence(train_size: int, sizes: list[int], at_scale: bool, bucket: list[Cell],
                evidence: list[Evidence], typed: list[Cell]) -> tuple[str, list[str]]:
    reasons = []
    in_range = sizes[0] <= train_size <= sizes[-1]
    seeds = min((c.score.n for c in bucket), default=0)
    tasks = len({c.key.task for c in typed})
    agree = sum(e.tied_with_best for e in evidence)
    span = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"
    if in_range:
        reasons.append(f"train size {train_size:,} within the measured range ({span})")
    else:
        reasons.append(f"train size {train_size:,} outside the measured range ({span}): "
                       "extrapolated")
    if not at_scale:
        used = sorted({c.key.train_size for c in bucket})
        reasons.append(f"nothing measured at this scale; evidence from size {used[0]:,}")
    reasons.append(f"{seeds} seed{'s' if seeds != 1 else ''} per cell"
                   + (" (single seed: no spread)" if seeds < 2 else ""))
    reasons.append(f"{tasks} task{'s' if tasks != 1 else ''} of this type measured")
    if evidence:
        reasons.append(f"tied with the best in {agree} of {len(evidence)} cases")
    if not in_range or seeds < 2:
        return "low", reasons
    if at_scale and tasks >= 2 and evidence and agree == len(evidence):
        return "high", reasons
    return "medium", reasons
