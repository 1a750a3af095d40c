"""The report's tables as plain strings, shared by the HTML page, Markdown and the CLI.

A table is a title, a header row, rows of cells and notes. A cell is a string, or a
:class:`Strong` string (the best score of a group: bold in HTML and Markdown).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from peftbench.analysis import records as rec
from peftbench.analysis.convergence import CLAIM, CONVERGED, THRESHOLDS
from peftbench.analysis.data_requirement import Requirement
from peftbench.analysis.overview import Analysis
from peftbench.analysis.records import FULL, Cell, Stat
from peftbench.config import compact


class Strong(str):
    """A cell to emphasise."""


@dataclass
class Table:
    key: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    group: int = 0  # leading columns that group rows (shown once per group in HTML)


# -- formatting ------------------------------------------------------------------------------
def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def stat(s: Stat, digits: int = 1, seeds: bool = True) -> str:
    if s.mean is None:
        return "-"
    text = f"{s.mean:,.{digits}f}"
    if s.std is not None:
        text += f" ± {s.std:,.{digits}f}"
    return text + (f" (n={s.n})" if seeds and s.n else "")


def count(value: float | None) -> str:
    """Parameters: 134.5M, 460.8K, 96."""
    if value is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:,.1f}{unit}"
    return f"{value:,.0f}"


def ratio(s: Stat, never: int = 0, full_never: int = 0) -> str:
    """A mean ratio over the seeds where both converged, with the seeds where PEFT
    (``never``) or full fine-tuning (``full_never``) never did."""
    extra = (f" (+{never} never)" if never else "") + (
        f" (+{full_never} full never)" if full_never else "")
    if s.mean is None:
        if never and not full_never:
            return "never"
        return "0 (full never)" if full_never and not never else (extra.strip() or "-")
    text = f"{s.mean:.2f}x"
    if s.std is not None:
        text += f" ± {s.std:.2f}"
    return text + extra


def pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _multi_model(analysis: Analysis) -> bool:
    return len({c.key.model for c in analysis.cells}) > 1


def _case(analysis: Analysis, model: str, task: str) -> str:
    return f"{task} ({model})" if _multi_model(analysis) else task


# -- tables ----------------------------------------------------------------------------------
def benchmark(analysis: Analysis) -> Table:
    # failed runs per cell, and per cell and configuration (lr, arguments)
    bad = Counter((rec.model_name(r), rec.task_name(r), rec.method(r), rec.train_size(r))
                  for r in analysis.failed)
    bad_here = Counter((rec.model_name(r), rec.task_name(r), rec.method(r), rec.train_size(r),
                        _configured(r)) for r in analysis.failed)
    best: dict[tuple[str, str, int], float] = {}
    for c in analysis.cells:
        k = (c.key.model, c.key.task, c.key.train_size)
        if c.score.mean is not None:
            best[k] = max(best.get(k, c.score.mean), c.score.mean)
    precisions = Counter(rec.precision(r) or "unknown" for c in analysis.cells for r in c.runs)
    mixed = len(set(precisions) - {"unknown"}) > 1  # older records may not say
    rows = []
    for c in analysis.cells:
        k = (c.key.model, c.key.task, c.key.train_size)
        score = stat(c.score)
        if c.score.mean is not None and c.score.mean == best.get(k):
            score = Strong(score)
        s = c.stats
        lr = f"{c.lr:g}" if c.lr is not None else "-"
        if c.method_args:  # as configured: what tells the selected configuration apart
            lr += " · " + " ".join(f"{k}={compact(v)}" for k, v in c.method_args.items())
        if c.configs_tried > 1:
            lr += f" (best of {c.configs_tried})"
        cell_key = (c.key.model, c.key.task, c.key.method, c.key.train_size)
        n_bad = (bad_here.get((*cell_key, _configured(c.runs[0])), 0),
                 bad.get(cell_key, 0))
        rows.append([_case(analysis, c.key.model, c.key.task), f"{c.key.train_size:,}",
                     c.key.method, c.metric or "-", score, lr, count(s["trainable"].mean),
                     num(s["trainable_pct"].mean, 3), num(s["train_seconds"].mean),
                     num(s["tokens_per_second"].mean, 0), num(s["memory_mb"].mean, 0),
                     _cell_notes(c, n_bad, mixed)])
    notes = [] if not mixed else [
        "These runs computed in more than one precision ("
        + ", ".join(f"{p}: {n} runs" for p, n in sorted(precisions.items()))
        + "; each cell's is in its notes): train s, tokens/s and peak MB compare only "
        "between runs of one precision, and scores can differ by rounding."]
    return Table("benchmark", "Benchmark", [
        "task", "train size", "method", "metric", "test score (mean ± seed std)",
        "lr · arguments",
        "trainable params", "trainable %", "train s", "tokens/s", "peak MB", "notes"], rows, [
        "Scores are the primary metric on the test split at the best validation checkpoint, "
        "0-100 (MCC -100..100), averaged over seeds; bold: best in its task and size.",
        "lr · arguments: the learning rate and method arguments (as configured), selected "
        "per method, task and size on the mean validation score (never test).",
        "peak MB: GPU memory when trained on a GPU, else the process's peak resident memory.",
        "Failed and diverged runs are not averaged in: see the failed runs table.", *notes],
        group=2)


def _configured(record: rec.Record) -> str:
    """A run's configuration as the suite set it (a failed run may lack the resolved lr)."""
    return json.dumps([rec.config(record).get("lr"), rec.method_args(record)],
                      sort_keys=True, default=str)


def _cell_notes(cell: Cell, failed: tuple[int, int], mixed_precision: bool) -> str:
    """The notes column: failed runs (of the configuration shown, of the cell's others)
    and, when the table mixes precisions, the cell's."""
    here, others = failed[0], failed[1] - failed[0]
    notes = [f"{here} failed/diverged"] if here else []
    if others:
        notes.append(f"{others} failed/diverged in other configurations")
    if mixed_precision:
        notes.append("/".join(sorted({rec.precision(r) or "unknown" for r in cell.runs})))
    return "; ".join(notes)


def convergence(analysis: Analysis) -> Table:
    rows = []
    for conv in analysis.convergence:
        c, vs = conv.cell, analysis.versus_of(conv.cell)
        reach = " / ".join(reached(conv.samples_to[f], 0) for f in THRESHOLDS)
        never = max(conv.never.values(), default=0)  # never improved: the same for every x
        reach = "never" if never == len(conv.runs) else reach + (
            f" ({never} never)" if never else "")
        runs = len(conv.runs)
        if c.key.method == FULL:
            versus = ["baseline", "", ""]
        elif vs is None:
            versus = ["no full baseline", "", ""]
        else:
            undetermined = f" ({vs.undetermined} undetermined)" if vs.undetermined else ""
            versus = [ratio(vs.samples_ratio, vs.never_ratios, vs.full_never) + undetermined,
                      ratio(vs.seconds_ratio, vs.never_ratios, vs.full_never),
                      num(vs.score_ratio, 2)]
        rows.append([
            _case(analysis, c.key.model, c.key.task), f"{c.key.train_size:,}", c.key.method,
            reach, ratio_free(conv.seconds_to[CONVERGED], conv.never[CONVERGED], 1),
            f"{conv.at_end[CONVERGED]} of {runs}", num(conv.auc_progress.mean, 2),
            num(conv.auc_score.mean, 1), num(conv.gap.mean, 1), *versus])
    return Table("convergence", "Convergence", [
        "task", "train size", "method", "samples to " + " / ".join(pct(f) for f in THRESHOLDS),
        f"seconds to {pct(CONVERGED)}", "still improving at end", "AUC progress", "AUC score",
        "final-best gap", "samples ratio vs full", "time ratio vs full",
        "score ratio vs full"], rows, [
        "progress = (score - step-0 score) / (best - step-0 score): 0 at the start, 1 at the "
        "run's best; defined the same way for negative metrics (MCC).",
        "samples / seconds to x %: the first validation point with progress >= x % (mean over "
        "seeds; resolution: the validation schedule; seconds: training time, evaluation "
        "excluded). 'never': runs that never improved on their step-0 score.",
        f"still improving at end: seeds that first reach {pct(CONVERGED)} at their last "
        "validation point (may not have converged: a lower bound).",
        "AUC progress: area under the progress curve over samples / samples span (1 = at its "
        "best from the start, 0 = never improved). AUC score: the time-averaged validation "
        "score (metric units). final-best gap: best - final validation score.",
        f"ratios vs full: PEFT / full per seed, samples (or seconds) to {pct(CONVERGED)} of "
        "each run's own best, mean ± seed std over the seeds where both got there (> 1: PEFT "
        "slower; +N never / +N full never: seeds where PEFT / full fine-tuning never got "
        "there; undetermined: seeds where neither got there, or both were still improving "
        "at the end). score ratio: mean test score PEFT / full."], group=2)


def reached(s: Stat, never: int) -> str:
    if s.mean is None:
        return "never" if never else "-"
    return f"{s.mean:,.0f}" + (f" ({never} never)" if never else "")


def ratio_free(s: Stat, never: int, digits: int = 0) -> str:
    """Samples or seconds to a threshold, with the count of runs that never got there."""
    if s.mean is None:
        return "never" if never else "-"
    text = f"{s.mean:,.{digits}f}"
    if s.std is not None:
        text += f" ± {s.std:,.{digits}f}"
    return text + (f" ({never} never)" if never else "")


def claim(analysis: Analysis) -> Table:
    rows = []
    for v in analysis.claims:
        numbers = ", ".join(
            f"{c.peft.key.method} {_median(c.median_ratio)}" for c in v.comparisons)
        rows.append([_case(analysis, v.model, v.task), f"{v.train_size:,}",
                     f"{v.scale} ({analysis.config.scales.describe(v.scale)})",
                     Strong(v.verdict) if v.scale == "low" else v.verdict, v.reason,
                     numbers or "-"])
    return Table("claim", f"Claim: “{CLAIM}”", [
        "task", "train size", "scale", "verdict", "why", "median samples ratio PEFT / full"],
        rows, [*claim_summary(analysis),
               f"A PEFT method converges slower when its median (over seeds) ratio of samples "
               f"to reach {pct(CONVERGED)} of its best, to full fine-tuning's, is above 1. "
               "The claim holds at a task and size when most PEFT methods converge slower."])


def _median(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:  # PEFT got there, full fine-tuning never did
        return "0 (full never)"
    return "never" if value == float("inf") else f"{value:.2f}x"


def claim_summary(analysis: Analysis) -> list[str]:
    """One sentence per scale: in how many tasks the claim holds."""
    by_scale: dict[str, Counter[str]] = defaultdict(Counter)
    for v in analysis.claims:
        by_scale[v.scale][v.verdict] += 1
    lines = []
    for scale in ("low", "medium", "high"):
        if scale in by_scale:
            counts = by_scale[scale]
            total = sum(counts.values())
            detail = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
            lines.append(f"{scale.capitalize()} data "
                         f"({analysis.config.scales.describe(scale)} examples): "
                         f"supported in {counts['supported']} of {total} task x size cases "
                         f"({detail}).")
    return lines


def _req(r: Requirement | None) -> str:
    if r is None:
        return "-"
    return r.label if r.kind == "not reached" else f"{r.label} ({r.kind})"


def data_requirement(analysis: Analysis) -> tuple[Table, Table]:
    pairs: dict[tuple[str, str, str], dict[str, Requirement]] = defaultdict(dict)
    for r in analysis.requirements:
        pairs[(r.model, r.task, r.method)][r.criterion] = r
    rows = []
    for (model, task, method), reqs in pairs.items():
        first = next(iter(reqs.values()))
        rows.append([_case(analysis, model, task), first.task_type, method,
                     _req(reqs.get("score")), _req(reqs.get("convergence")),
                     ", ".join(f"{s:,}" for s in first.sizes)])
    per_task = Table("requirement", "Data requirement per task", [
        "task", "type", "method", "reaches 95 % of full's score at", "converges no slower "
        "than full at", "measured sizes"], rows, [
        "The smallest train size from which the criterion holds at every larger measured "
        "size. measured: at a measured size ('<=' when already at the smallest); "
        "interpolated: linear in log(size) between the last miss and the first hit; "
        "not reached: not within the measured sizes.",
        "95 % of full's score: score >= full - 0.05 x |full| (works for negative MCC)."])
    by_type: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for t in analysis.type_requirements:
        by_type[(t.task_type, t.method)][t.criterion] = (
            t.label if t.not_reached else f"{t.label} ({t.worst.kind}, {t.worst.task})")
    type_rows = [[task_type, method, crit.get("score", "-"), crit.get("convergence", "-")]
                 for (task_type, method), crit in sorted(by_type.items())]
    per_type = Table("requirement_type", "Data requirement per task type", [
        "type", "method", "reaches 95 % of full's score at", "converges no slower than "
        "full at"], type_rows, ["Conservative: the largest requirement over the type's tasks "
                                "(and the task it comes from)."])
    return per_task, per_type


def decision(analysis: Analysis) -> Table:
    rows = []
    scales = analysis.config.scales
    for d in analysis.decisions:
        rec_, runner = d.recommended, d.runner_up
        rows.append([d.task_type, f"{d.scale} ({scales.describe(d.scale)})",
                     Strong(rec_.method) if rec_ else "none",
                     runner.method if runner else "-", d.why,
                     f"{len(d.cases)}", f"{d.noise:.1f} ({d.noise_kind})"])
    prefer = analysis.config.prefer
    return Table("decision", f"Decision table (preference: {prefer})", [
        "task type", "data scale", "recommended", "runner-up", "why", "cases", "noise"], rows, [
        "Per bucket, each method's mean gap (points) to the best method of each measured "
        "case (task x size). Methods within noise + slack of the best are tied (slack: "
        "accuracy 0, balanced 2, cheap 5 points; noise: pooled seed std, 1 point with a "
        "single seed); ties go to the lowest cost index (geometric mean of trainable "
        "parameters, training time and peak memory, each relative to the cheapest).",
        "peftbench recommend --task-type T --train-size N applies this table to a new task."])


def selective(analysis: Analysis) -> Table:
    """The selective-training study: each method on each part, parameters against score."""
    best: dict[tuple[str, str, int], float] = {}
    for v in analysis.selective:
        if v.score.mean is not None:
            best[v.case] = max(best.get(v.case, v.score.mean), v.score.mean)
    rows = []
    for v in analysis.selective:
        score = stat(v.score)
        if v.score.mean is not None and v.score.mean == best.get(v.case):
            score = Strong(score)
        ref = v.reference
        versus = "-" if ref is None or v.delta is None else (
            f"{v.delta:+.1f} vs {ref.method} ({ref.part})")
        fewer = "-" if v.fewer is None else f"{v.fewer:,.1f}x fewer" if v.fewer >= 1 else \
            f"{1 / v.fewer:,.1f}x more"
        verdict = "-" if v.keeps is None else "keeps" if v.keeps else "loses"
        rows.append([_case(analysis, v.model, v.task), f"{v.train_size:,}", v.method, v.part,
                     count(v.trainable), num(v.stats["trainable_pct"].mean, 3), score, versus,
                     fewer, verdict, "yes" if v.pareto else "", num(v.stats["memory_mb"].mean, 0),
                     num(v.stats["train_seconds"].mean)])
    return Table("selective", "Selective training: trained part, parameters and score", [
        "task", "train size", "method", "trained part", "trainable params", "trainable %",
        "test score (mean ± seed std)", "vs reference (points)", "parameters vs reference",
        "verdict", "Pareto", "peak MB", "train s"], rows, [
        *selective_summary(analysis),
        "Reference: full fine-tuning for partial fine-tuning, else the same method on the "
        "most parameters (e.g. LoRA on every layer). keeps: the mean score reaches 95 % of "
        "the reference's (score >= ref - 0.05 x |ref|); loses: it does not.",
        "Pareto: no other variant of the task and size trains at most as many parameters "
        "with a higher score. Within a variant the learning rate and other arguments are "
        "selected on the validation score.",
        "Run the shipped 'selective' suite, or list parts under method_variants in a suite "
        "(e.g. lora: [{}, {layers_to_transform: \"-6:\"}], partial: [{layers: \"-6:\"}])."],
        group=2)


def selective_summary(analysis: Analysis) -> list[str]:
    """The study's claim per case, in one sentence each."""
    lines = []
    for f in analysis.selective_findings:
        model, task, size = f.case
        where = f"{_case(analysis, model, task)}, {size:,} examples"
        b = f.best
        if b is None or b.reference is None or b.fewer is None:
            lines.append(f"{where}: {f.verdict}: {f.reason}.")
            continue
        evidence = (f"{b.method} on {b.part} kept "
                    f"{_kept(b.score.mean, b.reference.score.mean)} of {b.reference.method} "
                    f"({b.reference.part})'s score ({num(b.score.mean)} vs "
                    f"{num(b.reference.score.mean)}) with {b.fewer:,.1f}x fewer trainable "
                    f"parameters ({count(b.trainable)} vs {count(b.reference.trainable)})")
        reason = f" ({f.reason})" if f.reason else ""
        lines.append(f"{where}: {f.verdict}{reason}: {evidence}.")
    return lines


def _kept(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "the level"
    return f"{100 * value / reference:.0f} %"


def failed(analysis: Analysis) -> Table:
    rows = []
    for r in analysis.failed:
        error = (r.get("error") or "").strip().splitlines()
        lr = rec.learning_rate(r)
        args = " ".join(f"{k}={compact(v)}" for k, v in rec.method_args(r).items())
        rows.append([_case(analysis, rec.model_name(r), rec.task_name(r)), rec.method(r),
                     f"{rec.train_size(r) or '-'}", str(rec.seed(r)),
                     ("-" if lr is None else f"{lr:g}") + (f" · {args}" if args else ""),
                     str(r.get("status")), error[-1] if error else "-", rec.run_hash(r)])
    return Table("failed", "Failed and diverged runs", [
        "task", "method", "train size", "seed", "lr · arguments", "status", "error", "run"],
        rows,
        ["Listed here, never averaged into scores."])


def provenance(analysis: Analysis) -> list[Table]:
    records = analysis.records
    models: dict[tuple[Any, ...], int] = Counter()
    tasks: dict[tuple[Any, ...], int] = Counter()
    versions: dict[str, set[str]] = defaultdict(set)
    hardware: Counter[str] = Counter()
    shas: Counter[str] = Counter()
    for r in records:
        m, p = r.get("model") or {}, r.get("provenance") or {}
        if m:
            models[(m.get("name"), m.get("family"), "yes" if m.get("pretrained") else "no",
                    m.get("source"), _short(p.get("model_fingerprint")))] += 1
        t = r.get("task") or {}
        if t:
            tasks[(t.get("name"), t.get("type"), t.get("primary_metric"), t.get("source"),
                   _short(p.get("data_fingerprint")))] += 1
        for name, version in (p.get("versions") or {}).items():
            versions[name].add(str(version))
        if p.get("hardware"):
            precision = (r.get("run") or {}).get("precision")  # what the run computed in
            hardware[_hardware(p["hardware"])
                     + (f", precision: {precision}" if precision else "")] += 1
        shas[str(p.get("git_sha") or "unknown")] += 1

    def rows(counter: Counter) -> list[list[str]]:
        return [[_s(v) for v in key] + [str(n)] for key, n in sorted(
            counter.items(), key=lambda kv: tuple(_s(v) for v in kv[0]))]
    return [
        Table("prov_models", "Models", ["model", "family", "pretrained", "source",
                                        "fingerprint", "runs"], rows(models)),
        Table("prov_tasks", "Data", ["task", "type", "metric", "source", "data fingerprint",
                                     "runs"], rows(tasks),
              ["Fingerprints: the first 16 hex digits of a sha256 over the task's source "
               "files (or generated content) and over the model's weights."]),
        Table("prov_versions", "Versions", ["package", "version(s)"],
              [[k, ", ".join(sorted(v))] for k, v in sorted(versions.items())]),
        Table("prov_hardware", "Hardware and code", ["hardware / git sha", "runs"],
              [[h, str(n)] for h, n in hardware.most_common()]
              + [[f"git {s}", str(n)] for s, n in shas.most_common()]),
    ]


def _short(fingerprint: Any) -> Any:
    text = str(fingerprint) if fingerprint else None
    return text[:16] if text and len(text) > 16 else text


def _s(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_s(v)}" for k, v in value.items())
    return str(value)


def _hardware(hw: Any) -> str:
    if isinstance(hw, dict):
        return ", ".join(f"{k}: {_s(v)}" for k, v in hw.items() if v not in (None, "", []))
    return str(hw)


def all_tables(analysis: Analysis) -> dict[str, Table]:
    per_task, per_type = data_requirement(analysis)
    tables = [benchmark(analysis), convergence(analysis), claim(analysis), per_task, per_type,
              decision(analysis), selective(analysis), failed(analysis),
              *provenance(analysis)]
    return {t.key: t for t in tables}
