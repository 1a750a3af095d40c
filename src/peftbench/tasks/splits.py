"""Deterministic splitting: carving missing splits, train-size subsets, evaluation caps.

All randomness comes from :class:`random.Random` seeded with strings, which is stable across
Python processes and platforms. Carving and evaluation caps use fixed seeds, so validation
and test never depend on the run seed or on ``train_size``; only the training subset does.
Selections keep the examples' original order.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence

from peftbench.errors import DataError, UsageError
from peftbench.tasks.base import Example, TaskData

CARVE_SEED = "peftbench-carve-v1"  # fixed: carved splits are part of the task definition
EVAL_CAP_SEED = "peftbench-eval-cap-v1"  # fixed: capped eval sets are the same for every run


def allocate(counts: dict[Hashable, int], n: int) -> dict[Hashable, int]:
    """Split ``n`` over classes in proportion to ``counts`` (largest remainder).

    Every class present gets at least one example when ``n`` allows; ties go to the class
    listed first, so the result is deterministic.
    """
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    quota = {k: n * c / total for k, c in counts.items()}
    alloc = {k: min(counts[k], int(q)) for k, q in quota.items()}
    if n >= len(counts):
        for k in counts:
            alloc[k] = max(alloc[k], 1 if counts[k] else 0)
    while sum(alloc.values()) > n:
        k = max((k for k in counts if alloc[k] > 1), key=lambda k: alloc[k] - quota[k])
        alloc[k] -= 1
    while sum(alloc.values()) < n:
        k = max((k for k in counts if alloc[k] < counts[k]), key=lambda k: quota[k] - alloc[k])
        alloc[k] += 1
    return alloc


def choose(
    examples: Sequence[Example], n: int, seed: str, stratify: bool = False, grouped: bool = False
) -> list[int]:
    """Indices of ``n`` examples drawn with ``seed`` (sorted).

    ``stratify``: proportional per label. ``grouped``: whole groups (``Example.group``) are
    taken, so related rows stay together; the count then comes as close to ``n`` as the
    group sizes allow without exceeding it (at least one group).
    """
    rng = random.Random(seed)
    if grouped:
        groups: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(ex.group if ex.group is not None else f"\0{i}", []).append(i)
        order = list(groups.values())
        if not order:
            return []
        rng.shuffle(order)
        taken: list[int] = []
        for members in order:
            if len(taken) + len(members) <= n:
                taken.extend(members)
            if len(taken) == n:
                break
        return sorted(taken or order[0])
    if not stratify:
        return sorted(rng.sample(range(len(examples)), n))
    by_label: dict[Hashable, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    keys = sorted(by_label, key=lambda k: (k is None, k if k is not None else 0))
    alloc = allocate({k: len(by_label[k]) for k in keys}, n)
    picked: list[int] = []
    for k in keys:
        members = by_label[k][:]
        rng.shuffle(members)  # shuffled whatever n is: larger subsets contain smaller ones
        picked.extend(members[: alloc[k]])
    return sorted(picked)


def carve(
    examples: Sequence[Example], n: int, split: str, stratify: bool = False, grouped: bool = False
) -> tuple[list[Example], list[Example]]:
    """``(carved, rest)``: ``n`` examples for ``split`` taken with the fixed carving seed."""
    keep = set(choose(examples, n, f"{CARVE_SEED}:{split}", stratify, grouped))
    carved = [ex for i, ex in enumerate(examples) if i in keep]
    rest = [ex for i, ex in enumerate(examples) if i not in keep]
    return carved, rest


def carve_note(split: str, carved: int, source: str, how: str) -> str:
    """The note recording how a missing split was carved."""
    return (
        f"{split}: {carved} examples carved from {source} ({how}, fixed seed "
        f"'{CARVE_SEED}:{split}', independent of the run seed); the rest stay in the train pool"
    )


def class_counts(data: TaskData, examples: Sequence[Example]) -> str:
    """``"negative 40, positive 60"``: label counts named by verbalizer."""
    counts = Counter(ex.label for ex in examples)
    names = data.spec.labels
    return ", ".join(
        f"{names[k] if k is not None and k < len(names) else k} {counts[k]}"
        for k in sorted(counts, key=lambda k: -1 if k is None else k)
    )


def apply_scale(
    data: TaskData, train_size: int | None, seed: int, max_eval_examples: int | None
) -> TaskData:
    """Draw the training subset (run seed) and cap validation/test (fixed seed); add notes."""
    stratify = data.spec.type == "classification"
    how = "stratified by class" if stratify else "uniformly at random"
    notes = list(data.notes)
    train = data.train
    if train_size is not None:
        if train_size < 1:
            raise UsageError(f"train_size must be at least 1, got {train_size}")
        if train_size > len(train):
            raise DataError(
                f"train_size={train_size} is more than the {len(train)} examples in the training "
                f"pool of task '{data.spec.name}'; choose train_size <= {len(train)}"
            )
        idx = choose(train, train_size, f"peftbench-train:{seed}", stratify)
        train = [train[i] for i in idx]
        counts = f" ({class_counts(data, train)})" if stratify else ""
        notes.append(
            f"train: {train_size} of {len(data.train)} pool examples, drawn {how} with the "
            f"run seed {seed}{counts}"
        )
    else:
        notes.append(f"train: the whole pool of {len(train)} examples")
    splits = {"validation": data.validation, "test": data.test}
    if max_eval_examples is not None:
        if max_eval_examples < 1:
            raise UsageError(f"max_eval_examples must be at least 1, got {max_eval_examples}")
        for name, examples in splits.items():
            if len(examples) > max_eval_examples:
                idx = choose(examples, max_eval_examples, f"{EVAL_CAP_SEED}:{name}", stratify)
                splits[name] = [examples[i] for i in idx]
                notes.append(
                    f"{name}: capped to {max_eval_examples} of {len(examples)} examples, drawn "
                    f"{how} with the fixed seed '{EVAL_CAP_SEED}:{name}'"
                )
    return TaskData(
        spec=data.spec,
        train=train,
        validation=splits["validation"],
        test=splits["test"],
        fingerprint=data.fingerprint,
        source=data.source,
        notes=notes,
    )
