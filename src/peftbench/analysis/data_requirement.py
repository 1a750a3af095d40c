"""How much data each method needs to catch up with full fine-tuning.

Two criteria, per model, task and method, over the train sizes where both the method and
full fine-tuning were measured:

* ``score``: the method's mean score reaches 95 % of full fine-tuning's at that size
  (target ``full - 0.05 * |full|``, so negative MCC works too);
* ``convergence``: it converges no slower than full fine-tuning (median over seeds of
  samples-to-95 %-of-best, PEFT / full, <= 1).

The requirement is the smallest measured size from which the criterion holds at every
larger measured size (a lucky small size followed by misses does not count). Between the
last miss and the first hit, the size is interpolated linearly in log(size) on the margin
(score - target, or 1 - ratio) and flagged ``interpolated``; a hit at the smallest size is
``measured`` (the true requirement may be lower); no sustained hit is ``not reached``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from peftbench.analysis.convergence import VersusFull
from peftbench.analysis.records import FULL, Cell, baseline, index, score_target

MEASURED, INTERPOLATED, NOT_REACHED = "measured", "interpolated", "not reached"
CRITERIA = ("score", "convergence")


@dataclass
class Requirement:
    model: str
    task: str
    task_type: str
    method: str
    criterion: str  # score | convergence
    size: float | None
    kind: str  # measured | interpolated | not reached
    sizes: list[int]  # the measured sizes considered
    margins: list[float]
    at_smallest: bool = False  # met at the smallest measured size: may need even less
    between: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        if self.size is None:
            return f"not reached (<= {self.sizes[-1]:,})" if self.sizes else "no data"
        prefix = "<= " if self.at_smallest else "~" if self.kind == INTERPOLATED else ""
        return f"{prefix}{round(self.size):,}"


def threshold_size(sizes: list[int], margins: list[float]) -> tuple[float | None, str, bool,
                                                                    tuple[int, int] | None]:
    """(size, kind, at_smallest, between) for margins measured at increasing ``sizes``;
    a margin >= 0 means the criterion holds."""
    k = len(margins)
    while k > 0 and margins[k - 1] >= 0:
        k -= 1
    if k == len(margins):
        return None, NOT_REACHED, False, None
    if k == 0:
        return float(sizes[0]), MEASURED, True, None
    lo, hi = margins[k - 1], margins[k]
    if hi == 0 or not math.isfinite(lo) or not math.isfinite(hi):
        return float(sizes[k]), MEASURED, False, (sizes[k - 1], sizes[k])
    t = (0.0 - lo) / (hi - lo)
    log_size = math.log(sizes[k - 1]) + t * (math.log(sizes[k]) - math.log(sizes[k - 1]))
    return math.exp(log_size), INTERPOLATED, False, (sizes[k - 1], sizes[k])


def _score_margin(cell: Cell, full: Cell, fraction: float) -> float | None:
    ours, ref = cell.score.mean, full.score.mean
    if ours is None or ref is None:
        return None
    return ours - score_target(ref, fraction)


def requirements(cells: list[Cell], versus: list[VersusFull],
                 fraction: float = 0.95) -> list[Requirement]:
    """Every (model, task, PEFT method) x criterion requirement."""
    by_key = index(cells)
    ratio_of = {v.peft.key: v.median_ratio for v in versus}
    series: dict[tuple[str, str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.key.method != FULL:
            series[(cell.key.model, cell.key.task, cell.key.method)].append(cell)
    out = []
    for (model, task, method), method_cells in sorted(series.items()):
        method_cells.sort(key=lambda c: c.key.train_size)
        for criterion in CRITERIA:
            sizes, margins = [], []
            for cell in method_cells:
                full = baseline(by_key, cell.key)
                if full is None:
                    continue
                if criterion == "score":
                    margin = _score_margin(cell, full, fraction)
                else:
                    ratio = ratio_of.get(cell.key)
                    margin = None if ratio is None else 1.0 - ratio
                if margin is not None:
                    sizes.append(cell.key.train_size)
                    margins.append(margin)
            if not sizes:
                continue
            size, kind, at_smallest, between = threshold_size(sizes, margins)
            out.append(Requirement(model, task, method_cells[0].task_type, method, criterion,
                                   size, kind, sizes, margins, at_smallest, between))
    return out


@dataclass
class TypeRequirement:
    """The conservative requirement over every task of a type: the largest one."""

    task_type: str
    method: str
    criterion: str
    worst: Requirement
    tasks: int
    not_reached: int

    @property
    def label(self) -> str:
        if self.not_reached:
            return f"not reached in {self.not_reached} of {self.tasks} tasks"
        return self.worst.label


def by_task_type(reqs: list[Requirement]) -> list[TypeRequirement]:
    groups: dict[tuple[str, str, str], list[Requirement]] = defaultdict(list)
    for req in reqs:
        groups[(req.task_type, req.method, req.criterion)].append(req)
    out = []
    for (task_type, method, criterion), group in sorted(groups.items()):
        missed = [r for r in group if r.size is None]
        worst = missed[0] if missed else max(group, key=lambda r: r.size or 0)
        out.append(TypeRequirement(task_type, method, criterion, worst, len(group), len(missed)))
    return out
