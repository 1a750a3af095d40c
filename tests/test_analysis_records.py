"""Grouping into cells: learning rate chosen on validation, seeds averaged, failures apart."""

from __future__ import annotations

import pytest

from analysis_fakes import fake_suite, make_record
from peftbench.analysis import analyse_records
from peftbench.analysis.records import Stat, build_cells, split_runs, within_target


def test_stat_mean_std_and_count():
    assert Stat.of([1.0, 2.0, 3.0]) == Stat(2.0, 1.0, 3)
    assert Stat.of([4.0]) == Stat(4.0, None, 1)
    assert Stat.of([None, float("inf")]) == Stat(None, None, 0)


def test_learning_rate_is_selected_on_validation_never_on_test():
    records = [
        # lr 1e-3: better validation, worse test -> selected
        make_record(lr=1e-3, seed=0, scores=[50, 80], test=70.0),
        make_record(lr=1e-3, seed=1, scores=[50, 82], test=71.0),
        # lr 1e-4: worse validation, better test
        make_record(lr=1e-4, seed=0, scores=[50, 75], test=90.0),
        make_record(lr=1e-4, seed=1, scores=[50, 76], test=91.0),
    ]
    (cell,) = build_cells(records)
    assert cell.lr == 1e-3 and cell.configs_tried == 2
    assert cell.score == Stat(70.5, pytest.approx(0.7071, abs=1e-4), 2)
    assert cell.seeds == [0, 1]


def test_failed_and_diverged_runs_are_kept_apart_and_not_averaged():
    good = make_record(seed=0, scores=[50, 80], test=80.0)
    diverged = make_record(seed=1, status="diverged", scores=[50, 20], test=10.0,
                           error="training loss became nan at step 3")
    failed = make_record(seed=2, status="failed")
    ok, bad = split_runs([good, diverged, failed])
    assert ok == [good] and bad == [diverged, failed]
    (cell,) = build_cells([good, diverged, failed])
    assert cell.score == Stat(80.0, None, 1)
    analysis = analyse_records([good, diverged, failed])
    assert [r["status"] for r in analysis.failed] == ["diverged", "failed"]


def test_train_size_falls_back_to_the_examples_used():
    record = make_record(train_size=None)
    (cell,) = build_cells([record])
    assert cell.key.train_size == 8530


def test_cells_are_ordered_full_first_and_carry_costs():
    cells = build_cells(fake_suite(tasks=("rotten_tomatoes",), sizes=(100,)))
    assert [c.key.method for c in cells] == ["full", "bitfit", "ia3", "lora",
                                             "prompt_tuning"]
    lora = cells[3]
    assert lora.stats["trainable"].mean == 460_800
    assert lora.stats["memory_mb"].mean == 1420.0
    assert lora.method_args == {"r": 8, "alpha": 16, "dropout": 0.05}


def test_within_target_handles_negative_references():
    assert within_target(95.0, 100.0) and not within_target(94.9, 100.0)
    assert within_target(-10.5, -10.0) and not within_target(-10.6, -10.0)
