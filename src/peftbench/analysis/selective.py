"""Selective training: which parts of the model to train, trainable parameters against score.

The reference study's fourth finding: training only some parts of the model (later layers,
attention) keeps or improves the score with far fewer trainable parameters. A *variant* is a
method together with the part it trains, read from the run's method arguments (partial
fine-tuning's ``layers`` / ``modules``, LoRA's ``layers_to_transform`` / ``target_modules``,
(IA)3's ``target_modules``). Within a variant the learning rate and the other arguments are
selected on the validation score, as for any benchmark cell.

A (model, task, train size) enters the study when it has a partial fine-tuning run or a
method measured on more than one part. Each variant is compared with its *reference*: full
fine-tuning for partial fine-tuning, else the same method's variant that trains the most
parameters (e.g. LoRA on every layer). It *keeps* the score when its mean reaches 95 % of the
reference's (the data-requirement rule, :func:`~peftbench.analysis.records.within_target`).
It is on the *Pareto front* when no other variant of its case trains at most as many
parameters with a higher score (or fewer parameters with the same score).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from peftbench.analysis import records as rec
from peftbench.analysis.records import FULL, PARTIAL, Record, Stat

# the method arguments that choose which parts are trained (layers first, then modules)
LAYER_ARGS = ("layers", "layers_to_transform")
MODULE_ARGS = ("modules", "target_modules")
KEEPS_FRACTION = 0.95  # of the reference score
FAR_FEWER = 2.0  # "far fewer parameters": at least this factor


@dataclass
class Variant:
    """One method on one part of the model, in one (model, task, train size)."""

    model: str
    task: str
    train_size: int
    method: str
    part: str
    metric: str | None
    runs: list[Record]  # the selected configuration's runs, one per seed
    configs_tried: int
    stats: dict[str, Stat] = field(default_factory=dict)
    reference: Variant | None = None
    pareto: bool = False

    @property
    def case(self) -> tuple[str, str, int]:
        return (self.model, self.task, self.train_size)

    @property
    def score(self) -> Stat:
        return self.stats["score"]

    @property
    def trainable(self) -> float | None:
        return self.stats["trainable"].mean

    @property
    def delta(self) -> float | None:
        """Score minus the reference's, in points."""
        if self.reference is None or self.score.mean is None \
                or self.reference.score.mean is None:
            return None
        return self.score.mean - self.reference.score.mean

    @property
    def fewer(self) -> float | None:
        """How many times fewer trainable parameters than the reference."""
        if self.reference is None or not self.trainable or self.reference.trainable is None:
            return None
        return self.reference.trainable / self.trainable

    @property
    def keeps(self) -> bool | None:
        """Reaches 95 % of the reference's score (None without a reference)."""
        if self.delta is None:
            return None
        assert self.reference is not None and self.reference.score.mean is not None
        return rec.within_target(self.score.mean or 0.0, self.reference.score.mean,
                                 KEEPS_FRACTION)


def part(record: Record) -> str:
    """The part of the model a run trains, in words: ``all weights`` (full fine-tuning),
    ``last 6 layers · self_attn``, ``all layers · all-linear``; ``-`` for methods that do
    not choose parts (prompt tuning, BitFit)."""
    if rec.method(record) == FULL:
        return "all weights"
    args = rec.resolved_args(record)
    pieces = []
    for key in LAYER_ARGS:
        if key in args:
            pieces.append(_layers_text(args[key]))
    for key in MODULE_ARGS:
        if key in args:
            pieces.append(_modules_text(args[key], rec.method(record)))
    return " · ".join(pieces) or "-"


def _layers_text(value: Any) -> str:
    if value is None:
        return "all layers"
    if isinstance(value, str) and ":" in value:  # a range as given: "-6:", "0:4", "20:"
        start, _, stop = value.partition(":")
        if start.startswith("-") and not stop:
            return "last layer" if start == "-1" else f"last {start[1:]} layers"
        if not start and stop and not stop.startswith("-"):
            return f"first {stop} layers"
        return f"layers {value}"
    indices = value if isinstance(value, list) else [value]
    try:
        ints = sorted({int(i) for i in indices})
    except (TypeError, ValueError):
        return f"layers {value}"
    if ints and ints[-1] < 0:  # counted from the end
        if ints == list(range(-len(ints), 0)):
            return "last layer" if len(ints) == 1 else f"last {len(ints)} layers"
        return "layers " + ", ".join(str(i) for i in ints)
    if any(i < 0 for i in ints):
        return "layers " + ", ".join(str(i) for i in ints)
    return "layer " + _ranges(ints) if len(ints) == 1 else "layers " + _ranges(ints)


def _ranges(ints: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    groups: list[list[int]] = []
    for i in ints:
        if groups and i == groups[-1][-1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return ", ".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def _modules_text(value: Any, method: str) -> str:
    if value is None:  # partial: every module of the chosen layers; peft methods: its choice
        return "all modules" if method == PARTIAL else "default modules"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def variants(records: Iterable[Record]) -> list[Variant]:
    """The selective-training study of usable ``records``: variants of the cases that have
    one, with references and Pareto flags, sorted by case, then method, then parameters."""
    groups: dict[tuple[str, str, int], dict[tuple[str, str], dict[str, list[Record]]]] = \
        defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        size = rec.train_size(record)
        if not rec.is_ok(record) or size is None:
            continue
        case = (rec.model_name(record), rec.task_name(record), size)
        groups[case][(rec.method(record), part(record))][rec.config_key(record)].append(record)
    out: list[Variant] = []
    for (model, task, size), by_variant in groups.items():
        methods = [m for m, _ in by_variant]
        if PARTIAL not in methods and len(methods) == len(set(methods)):
            continue  # nothing selective measured here
        case = []
        for (method, name), configs in by_variant.items():
            runs, stats = rec.selected_runs(configs)
            case.append(Variant(model, task, size, method, name, rec.metric(runs[0]), runs,
                                len(configs), stats))
        _link_references(case)
        _mark_pareto(case)
        out += sorted(case, key=lambda v: (rec.method_order(v.method), -(v.trainable or 0),
                                           v.part))
    return sorted(out, key=lambda v: (v.model, v.task, v.train_size))


def _link_references(case: list[Variant]) -> None:
    full = next((v for v in case if v.method == FULL), None)
    by_method: dict[str, list[Variant]] = defaultdict(list)
    for v in case:
        by_method[v.method].append(v)
    for method, group in by_method.items():
        if method == FULL:
            continue
        reference = full if method == PARTIAL else _widest(group)
        for v in group:
            v.reference = reference if reference is not v else None


def _widest(group: list[Variant]) -> Variant | None:
    """The variant that trains strictly the most parameters; of several equal ones, the one
    on every layer; None when that does not single one out (or counts are missing)."""
    counted = [v for v in group if v.trainable is not None]
    if len(group) < 2 or not counted:
        return None
    top = max(v.trainable or 0 for v in counted)
    widest = [v for v in counted if v.trainable == top]
    if len(widest) > 1:
        widest = [v for v in widest if v.part.startswith("all layers")]
    return widest[0] if len(widest) == 1 else None


def _mark_pareto(case: list[Variant]) -> None:
    scored = [v for v in case if v.score.mean is not None and v.trainable is not None]
    for v in scored:
        v.pareto = not any(
            (w.trainable <= v.trainable and w.score.mean > v.score.mean)  # type: ignore[operator]
            or (w.trainable < v.trainable and w.score.mean >= v.score.mean)  # type: ignore[operator]
            for w in scored if w is not v)


SUPPORTED, NOT_SUPPORTED, UNDETERMINED = "supported", "not supported", "undetermined"


@dataclass(frozen=True)
class Finding:
    """The study's claim on one case: some variant keeps 95 % of its reference's score
    with at least :data:`FAR_FEWER` times fewer trainable parameters."""

    case: tuple[str, str, int]
    verdict: str  # supported | not supported | undetermined
    reason: str
    best: Variant | None  # the variant with the largest saving that kept the score
    compared: int  # variants with a reference

    @property
    def supported(self) -> bool:
        return self.verdict == SUPPORTED


def findings(study: list[Variant]) -> list[Finding]:
    """One finding per case with at least one variant that has a reference."""
    by_case: dict[tuple[str, str, int], list[Variant]] = defaultdict(list)
    for v in study:
        if v.keeps is not None:
            by_case[v.case].append(v)
    out = []
    for case, compared in by_case.items():
        kept = [v for v in compared if v.keeps]
        best = max((v for v in kept if v.fewer is not None), key=lambda v: v.fewer or 0.0,
                   default=None)
        if best is None:
            verdict, reason = (UNDETERMINED, "parameter counts missing") if kept else (
                NOT_SUPPORTED, f"no variant kept 95 % of its reference's score "
                f"({len(compared)} compared)")
        elif best.reference is not None and (best.reference.score.mean or 0.0) <= 0:
            verdict, reason = UNDETERMINED, ("the reference scores at or below zero (chance "
                                             "for MCC): no score to keep")
        elif (best.fewer or 0.0) >= FAR_FEWER:
            verdict, reason = SUPPORTED, ""
        else:
            verdict, reason = NOT_SUPPORTED, f"the score was kept with less than {FAR_FEWER:g}x " \
                "fewer parameters"
        out.append(Finding(case, verdict, reason, best, len(compared)))
    return out
