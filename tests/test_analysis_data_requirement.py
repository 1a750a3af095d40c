"""Data requirement: measured, interpolated (log scale) or not reached; MCC; by task type."""

from __future__ import annotations

import math

import pytest

from analysis_fakes import make_record
from peftbench.analysis.convergence import analyse
from peftbench.analysis.data_requirement import (
    INTERPOLATED,
    MEASURED,
    NOT_REACHED,
    by_task_type,
    requirements,
    threshold_size,
)
from peftbench.analysis.records import build_cells


def test_met_at_the_smallest_size_is_measured_and_an_upper_bound():
    assert threshold_size([100, 1000], [0.5, 1.0]) == (100.0, MEASURED, True, None)


def test_crossing_between_sizes_is_interpolated_in_log_size():
    size, kind, at_smallest, between = threshold_size([100, 1000, 10000], [-3.0, 1.0, 2.0])
    assert kind == INTERPOLATED and not at_smallest and between == (100, 1000)
    # 3/4 of the way from log(100) to log(1000)
    assert size == pytest.approx(10 ** 2.75)


def test_exactly_on_target_is_measured():
    assert threshold_size([100, 1000], [-1.0, 0.0]) == (1000.0, MEASURED, False, (100, 1000))


def test_never_reached_and_lucky_small_size_does_not_count():
    assert threshold_size([100, 1000], [-2.0, -1.0])[:2] == (None, NOT_REACHED)
    # met at 100, missed at 1000, met at 10000: the requirement is above 1000
    size, kind, _, between = threshold_size([100, 1000, 10000], [0.5, -1.0, 1.0])
    assert kind == INTERPOLATED and between == (1000, 10000)
    assert size == pytest.approx(10 ** 3.5)


def test_infinite_margin_cannot_be_interpolated():
    assert threshold_size([100, 1000], [-math.inf, 0.5])[:2] == (1000.0, MEASURED)


def records_for(task: str, scores: dict[tuple[str, int], float]) -> list[dict]:
    curve_fast = [0.0, 10.0, 10.0]
    out = []
    for (method, size), test in scores.items():
        out.append(make_record(task=task, method=method, train_size=size,
                               scores=[c + test for c in curve_fast], test=test))
    return out


def test_requirements_on_scores_with_negative_mcc():
    # CoLA-like MCC: full is negative at 100 (-10): 95 % target is -10.5
    records = records_for("cola", {("full", 100): -10.0, ("lora", 100): -10.4,
                                   ("full", 1000): 40.0, ("lora", 1000): 30.0,
                                   ("ia3", 100): -30.0, ("ia3", 1000): 39.0})
    cells = build_cells(records)
    reqs = {(r.method, r.criterion): r for r in requirements(cells, analyse(cells)[1])}
    lora = reqs[("lora", "score")]
    # met at 100 but not at 1000 (30 < 38): not sustained
    assert lora.kind == NOT_REACHED and lora.size is None
    assert lora.margins == pytest.approx([0.1, -8.0])
    ia3 = reqs[("ia3", "score")]
    assert ia3.kind == INTERPOLATED and 100 < ia3.size < 1000
    # convergence: identical curve shapes -> same speed -> no slower at 100
    assert reqs[("ia3", "convergence")].kind == MEASURED
    assert reqs[("ia3", "convergence")].at_smallest


def test_missing_full_baseline_gives_no_requirement():
    cells = build_cells(records_for("rotten_tomatoes", {("lora", 100): 80.0}))
    assert requirements(cells, analyse(cells)[1]) == []


def test_task_type_summary_is_the_largest_requirement():
    records = (records_for("rotten_tomatoes", {("full", 100): 80.0, ("lora", 100): 79.0})
               + records_for("cola", {("full", 100): 40.0, ("lora", 100): 20.0,
                                      ("full", 1000): 60.0, ("lora", 1000): 59.0}))
    cells = build_cells(records)
    summary = {(t.method, t.criterion): t for t in by_task_type(
        requirements(cells, analyse(cells)[1]))}
    lora = summary[("lora", "score")]
    assert lora.tasks == 2 and lora.not_reached == 0
    assert lora.worst.task == "cola" and 100 < lora.worst.size < 1000
    assert lora.label.startswith("~")
