"""The decision framework: task type x data scale -> recommended method, with its evidence.

For one bucket (task type, scale) the *cases* are its measured (model, task, train size)
combinations. Per method:

* **score gap**: mean over cases of (method's mean score - best method's mean score in
  that case), in points (<= 0). Gaps, not raw scores, so tasks with different metrics and a
  method missing from a case do not distort the comparison.
* **noise**: the pooled seed standard deviation of the bucket's cells
  (sqrt of the mean variance); 1 point when every cell has a single seed.
* **cost index**: geometric mean, over trainable parameters, training seconds and peak
  memory, of the method's value divided by the cheapest candidate's (1 = cheapest on all).

A method is *tied with the best* when its gap to the best candidate is within the
tolerance ``noise + slack``; slack is 0 points for ``--prefer accuracy`` (ties within
noise only), 2 for ``balanced`` and 5 for ``cheap``. Among the tied, the lowest cost index
wins; the runner-up is the next in that order, then the rest by score. Caps
(``--max-trainable-params``, ``--max-memory-mb``) remove methods whose mean exceeds them.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from peftbench.analysis.records import Cell, Stat
from peftbench.analysis.scales import Scales
from peftbench.errors import UsageError

PREFERENCES: dict[str, float] = {"accuracy": 0.0, "balanced": 2.0, "cheap": 5.0}
SINGLE_SEED_NOISE = 1.0
COSTS = ("trainable", "train_seconds", "memory_mb")
DEFAULT_SCALES = Scales()


@dataclass(frozen=True)
class DecisionConfig:
    scales: Scales = DEFAULT_SCALES
    prefer: str = "balanced"
    max_trainable_params: float | None = None
    max_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise UsageError(f"--prefer {self.prefer!r}: choose one of "
                             f"{', '.join(PREFERENCES)}.")
        for flag, cap in (("--max-trainable-params", self.max_trainable_params),
                          ("--max-memory-mb", self.max_memory_mb)):
            if cap is not None and not (math.isfinite(cap) and cap > 0):
                raise UsageError(f"{flag} {cap}: give a positive number, e.g. {flag} 1e6 "
                                 "(or leave it out for no cap).")

    @property
    def slack(self) -> float:
        return PREFERENCES[self.prefer]


@dataclass
class MethodSummary:
    """One method's evidence in a bucket."""

    method: str
    cells: list[Cell]
    gap: Stat  # over cases, points to the best method (<= 0)
    score: Stat  # over cases, the raw mean scores (mixed metrics: informational)
    seeds: int  # fewest seeds in any of its cells
    cost: dict[str, float | None]  # mean trainable, train_seconds, memory_mb, trainable_pct
    cost_index: float = 1.0

    def value(self, name: str) -> float | None:
        return self.cost.get(name)


@dataclass
class Decision:
    task_type: str
    scale: str
    prefer: str
    cases: list[tuple[str, str, int]]
    noise: float
    noise_kind: str  # "pooled seed std" | "single seed"
    tolerance: float
    ranking: list[MethodSummary]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    why: str = ""

    @property
    def recommended(self) -> MethodSummary | None:
        return self.ranking[0] if self.ranking else None

    @property
    def runner_up(self) -> MethodSummary | None:
        return self.ranking[1] if len(self.ranking) > 1 else None

    @property
    def config_slack(self) -> float:
        return self.tolerance - self.noise

    @property
    def best_gap(self) -> float:
        return max((m.gap.mean or 0.0) for m in self.ranking) if self.ranking else 0.0

    def tied(self, summary: MethodSummary) -> bool:
        return self.best_gap - (summary.gap.mean or 0.0) <= self.tolerance + 1e-9


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


def pooled_noise(cells: list[Cell]) -> tuple[float, str]:
    variances = [c.score.std ** 2 for c in cells if c.score.std is not None]
    if not variances:
        return SINGLE_SEED_NOISE, "single seed"
    return math.sqrt(statistics.fmean(variances)), "pooled seed std"


def summarise(cells: list[Cell]) -> list[MethodSummary]:
    """Per method: gap to the best in each case, seeds and mean costs."""
    cases: dict[tuple[str, str, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.score.mean is not None:
            cases[(cell.key.model, cell.key.task, cell.key.train_size)].append(cell)
    gaps: dict[str, list[float]] = defaultdict(list)
    by_method: dict[str, list[Cell]] = defaultdict(list)
    for case_cells in cases.values():
        best = max(c.score.mean for c in case_cells)  # type: ignore[type-var]
        for cell in case_cells:
            gaps[cell.key.method].append(cell.score.mean - best)  # type: ignore[operator]
            by_method[cell.key.method].append(cell)
    out = []
    for method, method_cells in by_method.items():
        cost = {name: _mean([c.stats[name].mean for c in method_cells])
                for name in (*COSTS, "trainable_pct")}
        out.append(MethodSummary(method, method_cells, Stat.of(gaps[method]),
                                 Stat.of(c.score.mean for c in method_cells),
                                 min(c.score.n for c in method_cells), cost))
    return out


def _cost_indices(summaries: list[MethodSummary]) -> None:
    cheapest = {name: min((v for s in summaries if (v := s.value(name))), default=None)
                for name in COSTS}
    for s in summaries:
        logs = [math.log(v / cheapest[name]) for name in COSTS
                if (v := s.value(name)) and cheapest[name]]
        s.cost_index = math.exp(statistics.fmean(logs)) if logs else 1.0


def _worst(s: MethodSummary, name: str) -> tuple[float, Cell] | None:
    """The method's largest ``name`` cost over its cells (a cap holds for every model and
    task it was measured on, not for their mean), with the cell."""
    measured = [(c.stats[name].mean, c) for c in s.cells if c.stats[name].mean is not None]
    return max(measured, key=lambda item: item[0]) if measured else None  # type: ignore


def _cap_reason(s: MethodSummary, config: DecisionConfig) -> str | None:
    for name, cap, what, unit in (
            ("trainable", config.max_trainable_params, "trainable parameters", ""),
            ("memory_mb", config.max_memory_mb, "MB peak memory", " MB")):
        worst = _worst(s, name) if cap is not None else None
        if worst is not None and worst[0] > cap:  # type: ignore[operator]
            cell = worst[1]
            return (f"{worst[0]:,.0f} {what} on {cell.key.model} / {cell.key.task} "
                    f"> cap {cap:,.0f}{unit}")
    return None


def decide(cells: list[Cell], task_type: str, scale: str, config: DecisionConfig) -> Decision:
    """Rank the methods measured in ``cells`` (one bucket) under ``config``."""
    noise, noise_kind = pooled_noise(cells)
    summaries = summarise(cells)
    excluded = [(s.method, r) for s in summaries if (r := _cap_reason(s, config))]
    candidates = [s for s in summaries if s.method not in dict(excluded)]
    _cost_indices(candidates)
    cases = sorted({(c.key.model, c.key.task, c.key.train_size) for c in cells})
    decision = Decision(task_type, scale, config.prefer, cases, noise, noise_kind,
                        noise + config.slack, [], excluded)
    decision.ranking = candidates  # for best_gap and tied()
    tied = sorted((s for s in candidates if decision.tied(s)),
                  key=lambda s: (s.cost_index, -(s.gap.mean or 0.0), s.method))
    rest = sorted((s for s in candidates if not decision.tied(s)),
                  key=lambda s: (-(s.gap.mean or 0.0), s.cost_index, s.method))
    decision.ranking = tied + rest
    decision.why = explain(decision)
    return decision


def _fmt_stat(stat: Stat) -> str:
    if stat.mean is None:
        return "-"
    spread = f" ± {stat.std:.1f}" if stat.std is not None else ""
    return f"{stat.mean:.1f}{spread}"


def _times(a: float | None, b: float | None, what: str) -> str | None:
    if not a or not b:
        return None
    ratio = a / b
    if 0.9 <= ratio <= 1.1:
        return f"about the same {what}"
    fewer = "fewer" if what.endswith("parameters") else "less"  # countable or not
    return f"{1 / ratio:.1f}x {fewer} {what}" if ratio < 1 else f"{ratio:.1f}x more {what}"


def points(value: float | None) -> str:
    """A signed score difference; no "-0.0"."""
    value = value or 0.0
    return "0.0" if abs(value) < 0.05 else f"{value:+.1f}"


def explain(decision: Decision) -> str:
    """Why the recommended method: its score against the best, and its cost against the
    runner-up (or against the best method when that one is more expensive)."""
    rec = decision.recommended
    if rec is None:
        caps = "; ".join(f"{m}: {r}" for m, r in decision.excluded)
        return f"no measured method fits the caps ({caps})" if caps else "no data"
    best = max(decision.ranking, key=lambda s: s.gap.mean or 0.0)
    gap = rec.gap.mean or 0.0
    evidence = (f"{rec.seeds} seed{'s' if rec.seeds != 1 else ''}, {len(rec.cells)} "
                f"case{'s' if len(rec.cells) != 1 else ''}")
    if best is rec and gap > -1e-9:
        score = f"{rec.method}: the best score in every case ({evidence})"
    elif best is rec:
        within = " within the caps" if decision.excluded else ""
        score = (f"{rec.method}: the best mean score{within}, {points(gap)} points to each "
                 f"case's best ({evidence})")
    else:
        score = (f"{rec.method}: {points(gap)} points to each case's best ({evidence}), within "
                 f"{decision.tolerance:.1f} of {best.method} ({points(best.gap.mean)}; "
                 f"{decision.noise_kind} {decision.noise:.1f} + {decision.config_slack:g} "
                 f"slack for '{decision.prefer}'), so the cheaper wins")
    other = decision.runner_up if best is rec else best
    parts = [score]
    if other is not None:
        diffs = [d for d in (
            _times(rec.value("trainable"), other.value("trainable"), "trainable parameters"),
            _times(rec.value("train_seconds"), other.value("train_seconds"), "training time"),
            _times(rec.value("memory_mb"), other.value("memory_mb"), "peak memory")) if d]
        parts.append(f"vs {other.method} ({points(other.gap.mean)})"
                     + (": " + ", ".join(diffs) if diffs else ""))
    if untrained_best(rec.cells):
        parts.append("but in every run its best validation score was the untrained model's "
                     "(step 0): training did not improve on the base model here, so the "
                     "scores compare starting points, not methods")
    return "; ".join(parts) + "."


def untrained_best(cells: list[Cell]) -> bool:
    """Every run of ``cells`` had its best validation score at step 0."""
    steps = [(r.get("scores") or {}).get("best_step") for c in cells for r in c.runs]
    return bool(steps) and all(step == 0 for step in steps)


def buckets(cells: list[Cell], scales: Scales) -> dict[tuple[str, str], list[Cell]]:
    """Cells grouped by (task type, scale)."""
    groups: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.task_type, scales.of(cell.key.train_size))].append(cell)
    return groups


def decision_table(cells: list[Cell], config: DecisionConfig) -> list[Decision]:
    """One decision per (task type, scale) with results."""
    order = {"low": 0, "medium": 1, "high": 2}
    groups = buckets(cells, config.scales)
    return [decide(groups[key], *key, config)
            for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9)))]

