"""Carving, stratified train-size subsets and evaluation caps."""

from __future__ import annotations

from collections import Counter

import pytest

from peftbench.errors import DataError, UsageError
from peftbench.tasks import load_task
from peftbench.tasks.base import Example, TaskData, TaskSpec
from peftbench.tasks.splits import allocate, apply_scale, carve, choose

SPEC = TaskSpec("t", "classification", "{x}", "accuracy", labels=("a", "b", "c"))


def _pool(counts: dict[int, int]) -> list[Example]:
    return [
        Example(f"{label}-{i}", SPEC.labels[label], label=label, group=f"g{i // 3}")
        for label, n in counts.items()
        for i in range(n)
    ]


def _data(counts: dict[int, int]) -> TaskData:
    pool = _pool(counts)
    return TaskData(SPEC, pool, pool[:50], pool[-50:], "f", "test")


def test_allocate_is_proportional_and_gives_every_class_one():
    assert allocate({0: 700, 1: 200, 2: 100}, 10) == {0: 7, 1: 2, 2: 1}
    assert allocate({0: 990, 1: 5, 2: 5}, 10) == {0: 8, 1: 1, 2: 1}
    assert allocate({0: 3, 1: 3}, 10) == {0: 3, 1: 3}
    assert allocate({0: 50, 1: 50, 2: 50}, 2) == {0: 1, 1: 1, 2: 0}
    for n in range(1, 58):
        assert sum(allocate({0: 31, 1: 17, 2: 9}, n).values()) == n


def test_stratified_subset_keeps_proportions_and_is_deterministic():
    data = _data({0: 600, 1: 300, 2: 100})
    a = apply_scale(data, 100, seed=1, max_eval_examples=None)
    b = apply_scale(data, 100, seed=1, max_eval_examples=None)
    c = apply_scale(data, 100, seed=2, max_eval_examples=None)
    assert Counter(e.label for e in a.train) == {0: 60, 1: 30, 2: 10}
    assert a.train == b.train and a.train != c.train
    assert Counter(e.label for e in c.train) == {0: 60, 1: 30, 2: 10}
    assert "train: 100 of 1000 pool examples" in a.notes[-1] and "seed 1" in a.notes[-1]


def test_larger_subsets_contain_smaller_ones():
    data = _data({0: 600, 1: 300, 2: 100})
    small = {e.input for e in apply_scale(data, 100, 5, None).train}
    large = {e.input for e in apply_scale(data, 500, 5, None).train}
    assert small < large


def test_train_size_errors():
    data = _data({0: 5, 1: 5})
    with pytest.raises(DataError, match="train_size=11 is more than the 10 examples"):
        apply_scale(data, 11, 0, None)
    with pytest.raises(UsageError, match="train_size must be at least 1"):
        apply_scale(data, 0, 0, None)


def test_carve_is_deterministic_disjoint_and_grouped():
    pool = _pool({0: 60, 1: 30})
    val, rest = carve(pool, 9, "validation", stratify=True)
    again, _ = carve(pool, 9, "validation", stratify=True)
    assert val == again and len(val) == 9 and len(rest) == 81
    assert not {e.input for e in val} & {e.input for e in rest}
    assert Counter(e.label for e in val) == {0: 6, 1: 3}
    grouped, rest = carve(pool, 10, "test", grouped=True)
    assert not {e.group for e in grouped} & {e.group for e in rest}
    assert len(grouped) <= 10 and len(grouped) >= 7


def test_choose_never_depends_on_order_of_calls():
    pool = _pool({0: 40, 1: 40})
    first = choose(pool, 10, "seed-x", stratify=True)
    choose(pool, 10, "other")
    assert choose(pool, 10, "seed-x", stratify=True) == first


@pytest.mark.parametrize("task", ["toy_cls", "toy_gen"])
def test_eval_splits_never_depend_on_train_size_or_seed(task):
    runs = [
        load_task(task, train_size=size, seed=seed, max_eval_examples=cap)
        for size in (None, 16, 500)
        for seed in (0, 1)
        for cap in (None, 20)
    ]
    for cap in (None, 20):
        group = [r for r, (_, _, c) in zip(runs, _grid(), strict=True) if c == cap]
        assert all(r.validation == group[0].validation and r.test == group[0].test for r in group)
    capped = load_task(task, max_eval_examples=20)
    assert len(capped.validation) == 20 and len(capped.test) == 20
    full = load_task(task)
    assert set(capped.test) <= set(full.test)
    if task == "toy_cls":
        assert Counter(e.label for e in capped.validation)[0] in (9, 10, 11)
    assert any("capped to 20 of 64" in note for note in capped.notes)


def _grid():
    return [(size, seed, cap) for size in (None, 16, 500) for seed in (0, 1) for cap in (None, 20)]
