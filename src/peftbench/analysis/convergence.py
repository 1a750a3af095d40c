"""How fast each run converges, and each PEFT method against full fine-tuning.

Definitions (documented in the report too):

* **progress** of a validation point: ``(score - score0) / (best - score0)``, where
  ``score0`` is the run's first validation score (step 0, before training) and ``best`` the
  best one. 0 = where it started, 1 = its best. It is defined the same way for negative
  metrics (MCC), because only differences to the start are used.
* **reaching x %** (x = 90, 95, 99): the first validation point with progress >= x / 100; its
  samples seen, optimizer steps and training seconds (evaluation time excluded). The
  resolution is the validation schedule (no interpolation between points). A run whose best
  score is not above its start never improved: it *never* converges.
* **AUC (progress)**: the area under the progress curve (clipped to [0, 1]) over samples
  seen, divided by the samples span: 1 = at its best from the start, about 0.5 = linear
  improvement, 0 = never improved. A pure speed measure, blind to how good the best is.
* **AUC (score)**: the area under the raw validation score over samples, divided by the
  samples span: the time-averaged validation score, in the metric's own units.
* **final-vs-best gap**: best - final validation score (>= 0 points).
* **still improving at the end**: the threshold is first reached at the *last* validation
  point, so the run may not have converged within its budget; its samples-to-converge is a
  lower bound. When both a PEFT run and its full fine-tuning seed are in that state, their
  comparison is *undetermined* (left out of the ratios).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from peftbench.analysis.records import (
    FULL,
    Cell,
    CellKey,
    Record,
    Stat,
    baseline,
    index,
    is_peft,
    run_hash,
    seed,
)

THRESHOLDS: tuple[float, ...] = (0.90, 0.95, 0.99)
CONVERGED = 0.95  # the threshold that defines "converged" in comparisons
NO_DATA = Stat(None, None, 0)


@dataclass(frozen=True)
class Reach:
    """Where a run first reached a progress threshold."""

    samples: float
    steps: float
    seconds: float | None
    at_end: bool = False  # first reached at the last validation point (a lower bound)


@dataclass
class RunConvergence:
    run_hash: str
    seed: int
    start: float
    best: float
    final: float
    reach: dict[float, Reach | None]  # None: never reached
    auc_progress: float | None
    auc_score: float | None

    @property
    def improved(self) -> bool:
        return self.best > self.start

    @property
    def gap(self) -> float:
        return self.best - self.final


def _points(record: Record) -> list[dict[str, Any]]:
    points = [p for p in record.get("curve") or []
              if isinstance(p.get("val_score"), int | float) and math.isfinite(p["val_score"])]
    return sorted(points, key=lambda p: p.get("step") or 0)


def _trapezoid(xs: list[float], ys: list[float]) -> float:
    pairs = zip(xs, xs[1:], ys, ys[1:], strict=False)
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in pairs)


def run_convergence(record: Record,
                    thresholds: Iterable[float] = THRESHOLDS) -> RunConvergence | None:
    """Convergence numbers of one run's curve; None if it has no validation point."""
    points = _points(record)
    if not points:
        return None
    scores = [float(p["val_score"]) for p in points]
    start, best = scores[0], max(scores)
    span = best - start
    progress = [(s - start) / span if span > 0 else 0.0 for s in scores]
    reach: dict[float, Reach | None] = {}
    for fraction in thresholds:
        hit = next((i for i, g in enumerate(progress) if span > 0 and g >= fraction - 1e-9),
                   None)
        reach[fraction] = None if hit is None else Reach(
            float(points[hit].get("samples") or 0), float(points[hit].get("step") or 0),
            points[hit].get("seconds"), at_end=hit == len(points) - 1 and hit > 0)
    xs = [float(p.get("samples") or 0) for p in points]
    width = xs[-1] - xs[0]
    auc_p = auc_s = None
    if width > 0:
        auc_p = _trapezoid(xs, [min(1.0, max(0.0, g)) for g in progress]) / width
        auc_s = _trapezoid(xs, scores) / width
    return RunConvergence(run_hash(record), seed(record), start, best, scores[-1], reach,
                          auc_p, auc_s)


@dataclass
class CellConvergence:
    """A cell's runs' convergence, with seed statistics."""

    cell: Cell
    runs: list[RunConvergence]
    samples_to: dict[float, Stat] = field(default_factory=dict)
    steps_to: dict[float, Stat] = field(default_factory=dict)
    seconds_to: dict[float, Stat] = field(default_factory=dict)
    never: dict[float, int] = field(default_factory=dict)
    at_end: dict[float, int] = field(default_factory=dict)  # still improving at the end
    auc_progress: Stat = NO_DATA
    auc_score: Stat = NO_DATA
    gap: Stat = NO_DATA

    @property
    def key(self) -> CellKey:
        return self.cell.key


def cell_convergence(cell: Cell, thresholds: Iterable[float] = THRESHOLDS) -> CellConvergence:
    thresholds = tuple(thresholds)
    runs = [c for c in (run_convergence(r, thresholds) for r in cell.runs) if c is not None]
    result = CellConvergence(cell, runs)
    for f in thresholds:
        hits = [r.reach[f] for r in runs if r.reach[f] is not None]
        result.samples_to[f] = Stat.of(h.samples for h in hits)
        result.steps_to[f] = Stat.of(h.steps for h in hits)
        result.seconds_to[f] = Stat.of(h.seconds for h in hits)
        result.never[f] = len(runs) - len(hits)
        result.at_end[f] = sum(1 for h in hits if h.at_end)
    result.auc_progress = Stat.of(r.auc_progress for r in runs)
    result.auc_score = Stat.of(r.auc_score for r in runs)
    result.gap = Stat.of(r.gap for r in runs)
    return result


# -- PEFT against full fine-tuning -----------------------------------------------------------
@dataclass
class VersusFull:
    """One PEFT cell against full fine-tuning at the same model, task and train size.

    Ratios are PEFT / full, per seed (paired by seed when both have it, else the ratio of
    the seed means): > 1 means PEFT needs more samples (or seconds) to converge. A PEFT run
    that never converges while full does counts as infinitely slower (ratio ``inf``). Seeds
    where neither converges, or both are still improving at their last validation point,
    are *undetermined* and left out.
    """

    peft: CellConvergence
    full: CellConvergence
    threshold: float
    samples_ratios: list[float]
    seconds_ratios: list[float]
    paired: bool
    undetermined: int
    score_ratio: float | None  # mean score PEFT / full, None when full's score <= 0
    score_diff: float | None  # mean score PEFT - full, points

    @property
    def samples_ratio(self) -> Stat:
        """Over the seeds where both converged (a 0, full never converged, and an ``inf``,
        PEFT never did, are counted apart: :attr:`full_never`, :attr:`never_ratios`)."""
        return Stat.of(r for r in self.samples_ratios if r != 0)

    @property
    def seconds_ratio(self) -> Stat:
        return Stat.of(r for r in self.seconds_ratios if r != 0)

    @property
    def full_never(self) -> int:
        """Seeds where PEFT converged while full fine-tuning never did."""
        return sum(1 for r in self.samples_ratios if r == 0)

    @property
    def never_ratios(self) -> int:
        """Seeds where PEFT never converged while full fine-tuning did."""
        return sum(1 for r in self.samples_ratios if math.isinf(r))

    @property
    def median_ratio(self) -> float | None:
        """The median over seeds of the samples ratio (``inf`` allowed)."""
        return statistics.median(self.samples_ratios) if self.samples_ratios else None

    @property
    def direction(self) -> str:
        """``slower`` / ``faster`` / ``same`` by the median samples ratio (> 1, < 1, = 1);
        ``unknown`` without any comparable seed."""
        median = self.median_ratio
        if median is None:
            return "unknown"
        return "slower" if median > 1 else "faster" if median < 1 else "same"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b for "samples (or seconds) to converge"; None means never converged."""
    if a is None and b is None:
        return None
    if a is None:
        return math.inf
    if b is None:
        return 0.0
    if b <= 0:
        return None if a <= 0 else math.inf
    return a / b


def _reach_value(run: RunConvergence, threshold: float, what: str) -> float | None:
    hit = run.reach.get(threshold)
    return None if hit is None else getattr(hit, what)


def _undetermined(a: RunConvergence, b: RunConvergence, threshold: float) -> bool:
    ra, rb = a.reach.get(threshold), b.reach.get(threshold)
    return (ra is None and rb is None) or (ra is not None and rb is not None
                                           and ra.at_end and rb.at_end)


def versus_full(peft: CellConvergence, full: CellConvergence,
                threshold: float = CONVERGED) -> VersusFull:
    by_seed = {r.seed: r for r in full.runs}
    common = [r for r in peft.runs if r.seed in by_seed]
    undetermined = [r for r in common if _undetermined(r, by_seed[r.seed], threshold)]
    common = [r for r in common if r not in undetermined]
    ratios: dict[str, list[float]] = {"samples": [], "seconds": []}
    for what in ratios:
        if common:
            pairs = [(_reach_value(r, threshold, what),
                      _reach_value(by_seed[r.seed], threshold, what)) for r in common]
        elif undetermined:
            pairs = []
        else:  # no seed in common: compare the means (never-converging runs ignored)
            stats = peft.samples_to if what == "samples" else peft.seconds_to
            full_stats = full.samples_to if what == "samples" else full.seconds_to
            pairs = [(stats[threshold].mean, full_stats[threshold].mean)]
        ratios[what] = [x for x in (_ratio(a, b) for a, b in pairs) if x is not None]
    p_score, f_score = peft.cell.score.mean, full.cell.score.mean
    score_ratio = p_score / f_score if p_score is not None and f_score and f_score > 0 else None
    diff = p_score - f_score if p_score is not None and f_score is not None else None
    return VersusFull(peft, full, threshold, ratios["samples"], ratios["seconds"],
                      bool(common or undetermined), len(undetermined), score_ratio, diff)


def analyse(cells: list[Cell], thresholds: Iterable[float] = THRESHOLDS,
            threshold: float = CONVERGED) -> tuple[list[CellConvergence], list[VersusFull]]:
    """Convergence of every cell, and every PEFT cell that has a full baseline against it."""
    thresholds = tuple(sorted({*thresholds, threshold}))
    conv = {c.key: cell_convergence(c, thresholds) for c in cells}
    by_key = index(cells)
    versus = []
    for cell in cells:
        base = baseline(by_key, cell.key)
        if cell.key.method != FULL and base is not None:
            versus.append(versus_full(conv[cell.key], conv[base.key], threshold))
    return list(conv.values()), versus


# -- the study's claim -----------------------------------------------------------------------
CLAIM = "PEFT converges slower than full fine-tuning in low-data regimes"


@dataclass
class ClaimVerdict:
    """The claim at one model, task and train size."""

    model: str
    task: str
    train_size: int
    scale: str
    verdict: str  # supported | not supported | mixed | insufficient data
    slower: list[str]
    not_slower: list[str]
    comparisons: list[VersusFull]
    reason: str


def check_claim(cells: list[Cell], versus: list[VersusFull],
               scale_of: Any) -> list[ClaimVerdict]:
    """Per model, task and train size: do most PEFT methods converge slower (by samples to
    reach 95 % of their best) than full fine-tuning? ``scale_of(size)`` names the scale.
    Partial fine-tuning is compared with full in ``versus`` but is no PEFT method here."""
    by_case: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        by_case.setdefault((cell.key.model, cell.key.task, cell.key.train_size), []).append(cell)
    verdicts = []
    for (model, task, size), case_cells in sorted(by_case.items()):
        comps = [v for v in versus if (v.peft.key.model, v.peft.key.task,
                                       v.peft.key.train_size) == (model, task, size)
                 and is_peft(v.peft.key.method)]
        known = [v for v in comps if v.direction != "unknown"]
        slower = [v.peft.key.method for v in known if v.direction == "slower"]
        not_slower = [v.peft.key.method for v in known if v.direction != "slower"]
        has_full = any(c.key.method == FULL for c in case_cells)
        if not has_full:
            verdict, reason = "insufficient data", "no full fine-tuning baseline"
        elif not known and any(v.undetermined for v in comps):
            verdict = "insufficient data"
            reason = ("undetermined: PEFT and full fine-tuning still improving at their last "
                      "validation point (train longer or validate more often)")
        elif not known:
            verdict, reason = "insufficient data", "no PEFT method comparable to full"
        elif len(slower) * 2 > len(known):
            verdict = "supported"
            reason = f"{len(slower)} of {len(known)} PEFT methods converge slower"
        elif len(slower) * 2 < len(known):
            verdict = "not supported"
            reason = f"only {len(slower)} of {len(known)} PEFT methods converge slower"
        else:
            verdict = "mixed"
            reason = f"{len(slower)} of {len(known)} PEFT methods converge slower"
        verdicts.append(ClaimVerdict(model, task, size, scale_of(size), verdict, slower,
                                     not_slower, comps, reason))
    return verdicts

