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


def _ran(record: dict, when: str, **settings) -> dict:
    record["run"]["config"].update(settings)
    record["run"]["finished_at"] = when
    return record


def test_runs_of_another_setup_are_set_aside_not_averaged():
    """Two suites with other budgets in one database (or a task run again on edited data)
    made one cell of five 'seeds' out of two setups."""
    from peftbench.analysis.records import build_cells, set_aside_note

    older = [_ran(make_record(method="full", seed=s, test=90.0), "2026-05-01T10:00:00",
                  max_steps=20) for s in (0, 1, 2)]
    newer = [_ran(make_record(method="full", seed=s, test=50.0), "2026-05-02T10:00:00",
                  max_steps=4) for s in (0, 1)]
    [cell] = build_cells(older + newer)
    assert cell.seeds == [0, 1] and cell.score.mean == 50.0 and cell.score.n == 2
    assert len(cell.set_aside) == 3 and cell.set_aside_why == "max_steps 4 kept"
    note = set_aside_note([cell])
    assert note.startswith("3 runs set aside: another setup than the latest runs of their "
                           "cell, or an older run of a seed run again: rotten_tomatoes / "
                           "smollm2-135m / full / n=100 (max_steps 4 kept). Compare one "
                           "suite's runs with --suite")
    edited = make_record(method="full", seed=2, test=10.0)
    edited["provenance"]["data_fingerprint"] = "0" * 64
    [cell] = build_cells([*newer, _ran(edited, "2026-05-03T10:00:00", max_steps=4)])
    assert cell.seeds == [2] and cell.set_aside_why == "other data"


def test_a_seed_run_again_counts_once():
    from peftbench.analysis.records import build_cells

    runs = [_ran(make_record(method="lora", seed=0, test=t), when)
            for t, when in ((60.0, "2026-05-01T10:00:00"), (70.0, "2026-05-02T10:00:00"))]
    [cell] = build_cells(runs)
    assert cell.score.n == 1 and cell.score.mean == 70.0
    assert cell.set_aside_why == "an older run of a seed run again"


def test_one_setup_per_cell_across_learning_rates_and_in_any_order():
    """Each configuration kept its own latest setup: lr 1e-3 at 1 step was compared with
    lr 3e-3 at 3 steps ('best of 2'). Ties in time went by list order."""
    old = [_ran(make_record(lr=1e-3, seed=s, test=90.0), "2026-05-01T10:00:00", max_steps=1)
           for s in (0, 1)]
    new = [_ran(make_record(lr=3e-3, seed=s, test=50.0), "2026-05-02T10:00:00", max_steps=3)
           for s in (0, 1)]
    [cell] = build_cells(old + new)
    assert cell.configs_tried == 1 and cell.lr == 3e-3 and len(cell.set_aside) == 2
    tied = [_ran(make_record(seed=s), "2026-05-01T10:00:00", max_steps=5) for s in (0, 1)]
    lone = [_ran(make_record(seed=0), "2026-05-01T10:00:00", max_steps=1)]
    for order in (tied + lone, lone + tied):
        [cell] = build_cells(order)
        assert cell.seeds == [0, 1] and cell.set_aside_why == "max_steps 5 kept"


def test_a_setting_an_older_record_lacks_counts_as_its_default():
    plain = make_record(seed=0)
    older = make_record(seed=1)
    del older["run"]["config"]["warmup_ratio"]  # written before the setting existed
    [cell] = build_cells([plain, older])
    assert cell.seeds == [0, 1] and not cell.set_aside


def test_the_selective_study_leaves_set_aside_runs_out():
    runs = [_ran(make_record(method=m, seed=s, test=t), when, max_steps=steps)
            for m in ("full", "partial") for s in (0, 1)
            for t, when, steps in ((50.0, "2026-05-01T10:00:00", 1),
                                   (90.0, "2026-05-02T10:00:00", 100))]
    analysis = analyse_records(runs)
    assert {c.key.method: (c.score.n, len(c.set_aside)) for c in analysis.cells} == {
        "full": (2, 2), "partial": (2, 2)}
    assert analysis.selective and all(v.stats["score"].n == 2 for v in analysis.selective)


def test_a_failure_of_another_setup_is_set_aside_not_counted_against_the_cell():
    """A run that diverged under an older budget kept saying '1 failed/diverged' next to
    the new setup's scores, forever."""
    old_failure = _ran(make_record(method="lora", seed=3, status="diverged",
                                   error="training loss became nan at step 3"),
                       "2026-05-01T10:00:00", max_steps=20)
    failure_here = _ran(make_record(method="lora", seed=4, status="failed", error="boom"),
                        "2026-05-02T11:00:00", max_steps=4)
    unknown_data = _ran(make_record(method="lora", seed=5, status="failed", error="no data"),
                        "2026-05-02T12:00:00", max_steps=4)
    unknown_data["provenance"].pop("data_fingerprint", None)  # failed before loading it
    elsewhere = _ran(make_record(method="ia3", seed=0, status="failed", error="boom"),
                     "2026-05-01T10:00:00", max_steps=20)
    newer = [_ran(make_record(method="lora", seed=s, test=70.0), "2026-05-02T10:00:00",
                  max_steps=4) for s in (0, 1)]
    analysis = analyse_records([old_failure, failure_here, unknown_data, elsewhere, *newer])
    assert analysis.failed == [failure_here, unknown_data, elsewhere]
    [cell] = analysis.cells
    assert cell.set_aside == [old_failure] and cell.set_aside_why == "max_steps 4 kept"
