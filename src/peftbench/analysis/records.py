"""Run records -> benchmark cells: grouping, learning-rate selection and seed statistics.

A *cell* is one (model, task, method, train size): the runs of every learning rate /
method-argument configuration tried there. The configuration with the best mean
*validation* score over seeds is selected (never test); the cell's numbers are that
configuration's runs, averaged over seeds with their spread. Failed and diverged runs are
kept apart (:func:`split_runs`) and never averaged into scores.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]
FULL = "full"
PARTIAL = "partial"  # full fine-tuning of some layers / modules: not a PEFT technique


def is_peft(method_name: str) -> bool:
    """Whether a method is one of the parameter-efficient techniques the study's claims are
    about (everything but full and partial fine-tuning)."""
    return method_name not in (FULL, PARTIAL)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None for a single value) and count."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


# -- reading one record ----------------------------------------------------------------------
def config(record: Record) -> dict[str, Any]:
    return record["run"]["config"]


def run_hash(record: Record) -> str:
    return str(record["run"].get("hash", "?"))


def model_name(record: Record) -> str:
    return str((record.get("model") or {}).get("name") or config(record)["model"])


def task_name(record: Record) -> str:
    return str((record.get("task") or {}).get("name") or config(record)["task"])


def task_type(record: Record) -> str:
    return str((record.get("task") or {}).get("type") or "unknown")


def method(record: Record) -> str:
    return str(config(record)["method"])


def seed(record: Record) -> int:
    return int(config(record).get("seed") or 0)


def train_size(record: Record) -> int | None:
    """The configured train size, else the number of training examples actually used."""
    size = config(record).get("train_size")
    if size is None:
        size = ((record.get("task") or {}).get("sizes") or {}).get("train")
    return int(size) if size is not None else None


def precision(record: Record) -> str | None:
    """What the run computed in: ``run.precision``; the configured value for records made
    before ``precision: auto`` existed; None when unknown."""
    value = record["run"].get("precision") or config(record).get("precision")
    return str(value) if value and value != "auto" else None


def learning_rate(record: Record) -> float | None:
    lr = record["run"].get("lr", config(record).get("lr"))
    return float(lr) if lr is not None else None


def method_args(record: Record) -> dict[str, Any]:
    """The method arguments as configured (what to pass to ``--method-arg``)."""
    return dict(config(record).get("method_args") or {})


def resolved_args(record: Record) -> dict[str, Any]:
    """The method arguments with the method's defaults filled in, when recorded."""
    return dict(record["run"].get("method_args") or method_args(record))


def metric(record: Record) -> str | None:
    scores = record.get("scores") or {}
    return scores.get("primary") or (record.get("task") or {}).get("primary_metric")


def score(record: Record, split: str) -> float | None:
    """The primary metric on ``split`` ("val" or "test"), at the best validation step."""
    values = (record.get("scores") or {}).get(split) or {}
    value = values.get(metric(record) or "")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def peak_memory_mb(record: Record) -> float | None:
    """Peak GPU memory when the run used a GPU, else the process's peak resident memory."""
    eff = record.get("efficiency") or {}
    value = eff.get("peak_gpu_mb") or eff.get("peak_rss_mb")
    return float(value) if value is not None else None


def efficiency(record: Record, key: str) -> float | None:
    value = (record.get("efficiency") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def params(record: Record, key: str) -> float | None:
    value = (record.get("params") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def is_ok(record: Record) -> bool:
    """A completed run with a primary score: the only kind that enters averages."""
    return record.get("status") == "completed" and (score(record, "test") is not None
                                                     or score(record, "val") is not None)


def split_runs(records: Iterable[Record]) -> tuple[list[Record], list[Record]]:
    """(usable runs, failed / diverged / score-less runs)."""
    ok, bad = [], []
    for record in records:
        (ok if is_ok(record) else bad).append(record)
    return ok, bad


def final_score(record: Record) -> float | None:
    """The run's reported score: test at the best validation checkpoint, else validation."""
    value = score(record, "test")
    return value if value is not None else score(record, "val")


# -- cells -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellKey:
    model: str
    task: str
    method: str
    train_size: int


@dataclass
class Cell:
    """One (model, task, method, train size) with its selected configuration's runs."""

    key: CellKey
    task_type: str
    metric: str | None
    runs: list[Record]  # the selected configuration's runs, one per seed
    lr: float | None
    method_args: dict[str, Any]
    resolved_args: dict[str, Any] = field(default_factory=dict)
    configs_tried: int = 1
    stats: dict[str, Stat] = field(default_factory=dict)
    # runs of this cell left out: another setup than its latest runs', or an older run of
    # a seed run again; with why (the settings that differ)
    set_aside: list[Record] = field(default_factory=list)
    set_aside_why: str = ""

    @property
    def score(self) -> Stat:
        return self.stats["score"]

    @property
    def seeds(self) -> list[int]:
        return sorted(seed(r) for r in self.runs)


def config_key(record: Record) -> str:
    """What distinguishes configurations of one method in a cell: learning rate and
    method arguments."""
    return json.dumps({"lr": learning_rate(record), "args": config(record).get("method_args")},
                      sort_keys=True, default=str)


# what may differ between the runs of one configuration: the seed, and where or how it ran
_NOT_SETUP = frozenset({"seed", "data_dir", "device", "compile", "model", "task", "lr",
                        "method_args"})


def setup(record: Record) -> dict[str, Any]:
    """What must be equal for runs to be seeds of one cell: the training settings (a
    setting an older record lacks counts as its default), the data and a pretrained
    model's weights (fingerprints: a task or model path may be spelled otherwise; a
    randomly initialised model's weights differ by seed)."""
    fields = {**_setting_defaults(), **config(record)}
    fields = {k: v for k, v in fields.items() if k not in _NOT_SETUP}
    provenance = record.get("provenance") or {}
    fields["data"] = provenance.get("data_fingerprint")
    if (record.get("model") or {}).get("pretrained"):  # random weights differ by seed
        fields["weights"] = provenance.get("model_fingerprint")
    return fields


@functools.cache
def _setting_defaults() -> dict[str, Any]:
    from peftbench.config import RunSpec

    return {name: info.get_default(call_default_factory=True)
            for name, info in RunSpec.model_fields.items() if not info.is_required()}


def _finished(record: Record) -> str:
    return str(record["run"].get("finished_at") or record["run"].get("started_at") or "")


def one_setup(runs: list[Record]) -> tuple[list[Record], list[Record], str]:
    """``(kept, set aside, why)`` for the runs of one cell: those of the setup run last
    (ties: the one with more seeds), one per configuration and seed (the latest), and the
    rest; ``why`` names the settings in which the set-aside runs differ."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in runs:
        groups[json.dumps(setup(record), sort_keys=True, default=str)].append(record)
    chosen_key = max(groups, key=lambda k: (max(_finished(r) for r in groups[k]),
                                            len({seed(r) for r in groups[k]}), k))
    latest: dict[tuple[str, int], Record] = {}
    for record in sorted(groups[chosen_key], key=_finished):
        latest[(config_key(record), seed(record))] = record
    kept = list(latest.values())
    aside = [r for r in runs if all(r is not k for k in kept)]
    return kept, aside, _why(setup(kept[0]), aside)


def _why(chosen: dict[str, Any], aside: list[Record]) -> str:
    """The settings in which the ``aside`` runs differ from the ``chosen`` setup."""
    differ = sorted({key for r in aside for key, value in setup(r).items()
                     if chosen.get(key) != value})
    return ", ".join(f"{key} {chosen.get(key)!r} kept" if key not in ("data", "weights")
                     else f"other {key}" for key in differ) or "an older run of a seed run again"


def _other_setup(record: Record, chosen: dict[str, Any]) -> bool:
    """True when a (failed) run's setup differs from ``chosen``; a fingerprint the run never
    got to record (it failed before loading the data or model) counts as no difference."""
    return any(chosen.get(key) != value for key, value in setup(record).items()
               if value is not None or key not in ("data", "weights"))


def set_aside_failures(failed: Iterable[Record], cells: Iterable[Cell]) -> list[Record]:
    """The failed runs that count against their cell: those of the setup the cell kept, or
    of a cell with no usable run. A failure of another setup (an older budget, edited data)
    joins the cell's ``set_aside`` runs instead, as its completed runs would."""
    by_key = index(cells)
    counted, touched = [], set()
    for record in failed:
        key = CellKey(model_name(record), task_name(record), method(record), train_size(record))
        cell = by_key.get(key)
        if cell is None or not _other_setup(record, setup(cell.runs[0])):
            counted.append(record)
            continue
        cell.set_aside.append(record)
        touched.add(key)
    for key in touched:
        cell = by_key[key]
        cell.set_aside_why = _why(setup(cell.runs[0]), cell.set_aside)
    return counted


STAT_GETTERS: dict[str, Callable[[Record], float | None]] = {
    "score": final_score,
    "val": lambda r: score(r, "val"),
    "trainable": lambda r: params(r, "trainable"),
    "trainable_pct": lambda r: params(r, "trainable_pct"),
    "total": lambda r: params(r, "total"),
    "train_seconds": lambda r: efficiency(r, "train_seconds"),
    "tokens_per_second": lambda r: efficiency(r, "tokens_per_second"),
    "memory_mb": peak_memory_mb,
    "adapter_bytes": lambda r: efficiency(r, "adapter_bytes"),
}


def select_configuration(configs: dict[str, list[Record]]) -> tuple[str, list[Record]]:
    """The configuration with the best mean validation score (then more seeds, then lr)."""
    def rank(item: tuple[str, list[Record]]) -> tuple[float, int, float]:
        val = Stat.of(score(r, "val") if score(r, "val") is not None else final_score(r)
                      for r in item[1]).mean
        lr = learning_rate(item[1][0]) or 0.0
        return (val if val is not None else -math.inf, len(item[1]), -lr)
    return max(configs.items(), key=rank)


def selected_runs(configs: dict[str, list[Record]]) -> tuple[list[Record], dict[str, Stat]]:
    """The selected configuration's runs (by seed) and their statistics."""
    _, runs = select_configuration(configs)
    runs = sorted(runs, key=seed)
    return runs, {name: Stat.of(get(r) for r in runs) for name, get in STAT_GETTERS.items()}





def build_cells(records: Iterable[Record]) -> list[Cell]:
    """Usable runs grouped into cells, each with its selected configuration and stats.

    The runs of one configuration are its seeds only when they ran the same setup
    (:func:`setup`): a database holding two suites with other budgets, or a task run again
    on edited data, keeps each configuration's latest setup and sets the others aside
    (``Cell.set_aside``, said by every command), never averaging them together.
    Runs without a train size are skipped. Cells are sorted by model, task, size, method
    (full fine-tuning first).
    """
    groups: dict[CellKey, list[Record]] = defaultdict(list)
    for record in records:
        size = train_size(record)
        if not is_ok(record) or size is None:
            continue
        groups[CellKey(model_name(record), task_name(record), method(record), size)].append(
            record)
    cells = []
    for key, mixed in groups.items():
        kept, aside, why = one_setup(mixed)
        configs: dict[str, list[Record]] = defaultdict(list)
        for record in kept:
            configs[config_key(record)].append(record)
        runs, stats = selected_runs(configs)
        cells.append(Cell(key=key, task_type=task_type(runs[0]), metric=metric(runs[0]),
                          runs=runs, lr=learning_rate(runs[0]), method_args=method_args(runs[0]),
                          resolved_args=resolved_args(runs[0]), configs_tried=len(configs),
                          stats=stats, set_aside=aside,
                          set_aside_why=why if aside else ""))
    return sorted(cells, key=lambda c: (c.key.model, c.key.task, c.key.train_size,
                                        method_order(c.key.method)))


def set_aside_note(cells: Iterable[Cell]) -> str | None:
    """One sentence on the runs :func:`build_cells` set aside, or None."""
    cells = [c for c in cells if c.set_aside]
    if not cells:
        return None
    count = sum(len(c.set_aside) for c in cells)
    listed = "; ".join(f"{c.key.task} / {c.key.model} / {c.key.method} / n={c.key.train_size} "
                       f"({c.set_aside_why})" for c in cells[:3])
    more = f"; and {len(cells) - 3} more cells" if len(cells) > 3 else ""
    return (f"{count} run{'s' if count != 1 else ''} set aside: another setup than the latest "
            f"runs of their cell, or an older run of a seed run again: {listed}{more}. "
            "Compare one suite's runs with --suite, or keep other setups in separate "
            "databases.")


def method_order(name: str) -> tuple[int, str]:
    """Full fine-tuning first, then alphabetical."""
    return (0 if name == FULL else 1, name)


def index(cells: Iterable[Cell]) -> dict[CellKey, Cell]:
    return {c.key: c for c in cells}


def baseline(cells_by_key: dict[CellKey, Cell], key: CellKey) -> Cell | None:
    """Full fine-tuning's cell for the same model, task and train size, if measured."""
    return cells_by_key.get(CellKey(key.model, key.task, FULL, key.train_size))


def score_target(reference: float, fraction: float = 0.95) -> float:
    """``fraction`` of a reference score, defined for negative scores too:
    ``reference - (1 - fraction) * |reference|`` (= ``fraction * reference`` when positive;
    below the reference when it is negative, e.g. MCC)."""
    return reference - (1.0 - fraction) * abs(reference)


def within_target(value: float, reference: float, fraction: float = 0.95) -> bool:
    """``value`` reaches ``fraction`` of ``reference`` (see :func:`score_target`)."""
    return value >= score_target(reference, fraction) - 1e-9
