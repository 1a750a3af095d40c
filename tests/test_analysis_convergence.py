"""Convergence: thresholds, "never", AUC, negative MCC, PEFT vs full, the study's claim."""

from __future__ import annotations

import math

import pytest

from analysis_fakes import make_record
from peftbench.analysis.convergence import (
    analyse,
    cell_convergence,
    check_claim,
    run_convergence,
    versus_full,
)
from peftbench.analysis.records import build_cells
from peftbench.analysis.scales import Scales


def test_thresholds_samples_steps_seconds_of_a_known_curve():
    # start 50, best 90: progress 0, .5, .9, .95, 1.0, .975 at 0, 80, ... 400 samples
    record = make_record(scores=[50, 70, 86, 88, 90, 89], samples_per_point=80,
                         seconds_per_point=2.0)
    conv = run_convergence(record)
    assert (conv.start, conv.best, conv.final, conv.gap) == (50, 90, 89, 1)
    assert conv.reach[0.90].samples == 160 and conv.reach[0.90].steps == 20
    assert conv.reach[0.90].seconds == 4.0
    assert conv.reach[0.95].samples == 240
    assert conv.reach[0.99].samples == 320 and not conv.reach[0.99].at_end
    # progress .0 .5 .9 .95 1 .975 -> trapezoid over 400 samples
    expected = 80 * (0.25 + 0.7 + 0.925 + 0.975 + 0.9875) / 400
    assert conv.auc_progress == pytest.approx(expected)
    assert conv.auc_score == pytest.approx(80 * (60 + 78 + 87 + 89 + 89.5) / 400)


def test_a_run_that_never_improves_never_converges():
    conv = run_convergence(make_record(scores=[50, 49, 50, 48]))
    assert not conv.improved
    assert all(hit is None for hit in conv.reach.values())
    assert conv.auc_progress == 0.0
    assert conv.gap == 2


def test_negative_mcc_scores_use_progress_from_the_start():
    # MCC from -20 to -5: "90 % of best" in raw terms would be meaningless; progress is not
    conv = run_convergence(make_record(task="cola", scores=[-20, -11, -6.5, -5],
                                       samples_per_point=100))
    assert conv.reach[0.90].samples == 200  # progress .6, .9, 1.0
    assert conv.reach[0.99].samples == 300 and conv.reach[0.99].at_end
    assert conv.auc_score < 0
    assert 0 < conv.auc_progress < 1


def test_reaching_only_at_the_last_point_is_flagged_still_improving():
    conv = run_convergence(make_record(scores=[50, 60, 70, 80]))
    assert conv.reach[0.95].at_end
    assert conv.reach[0.90].at_end


def test_single_point_curve_and_empty_curve():
    assert run_convergence(make_record(scores=[50])).auc_progress is None
    assert run_convergence(make_record(status="failed")) is None


def cells_for(*specs):
    """specs: (method, seed, scores) on rotten_tomatoes, 100 examples."""
    records = [make_record(method=m, seed=s, scores=scores) for m, s, scores in specs]
    return build_cells(records)


def test_peft_against_full_per_seed_ratios_and_spread():
    cells = cells_for(("full", 0, [50, 81.5, 82, 82, 82]), ("full", 1, [50, 70, 81, 82, 82]),
                      ("lora", 0, [50, 60, 70, 80, 80]), ("lora", 1, [50, 60, 70, 80, 80]))
    convs, versus = analyse(cells)
    (vs,) = versus
    # full reaches 95 % at 80 and 160 samples; lora at 240 in both seeds
    assert vs.samples_ratios == [3.0, 1.5]
    assert vs.samples_ratio.mean == pytest.approx(2.25)
    assert vs.samples_ratio.std == pytest.approx(math.sqrt(2 * 0.75 ** 2))
    assert vs.paired and vs.direction == "slower"
    assert vs.score_ratio == pytest.approx(79 / 81)
    assert vs.score_diff == pytest.approx(-2.0)
    full = next(c for c in convs if c.key.method == "full")
    assert full.samples_to[0.95].mean == 120 and full.samples_to[0.95].n == 2


def test_never_converging_peft_counts_as_infinitely_slower():
    cells = cells_for(("full", 0, [50, 80, 82]), ("ia3", 0, [50, 50, 50]))
    (vs,) = analyse(cells)[1]
    assert vs.samples_ratios == [math.inf]
    assert vs.never_ratios == 1 and vs.direction == "slower"
    assert vs.samples_ratio.mean is None  # inf is kept out of the mean


def test_both_still_improving_at_the_end_is_undetermined():
    cells = cells_for(("full", 0, [50, 60, 70]), ("lora", 0, [50, 55, 60]))
    (vs,) = analyse(cells)[1]
    assert vs.samples_ratios == [] and vs.undetermined == 1
    assert vs.direction == "unknown"


def test_unpaired_seeds_compare_the_means():
    cells = cells_for(("full", 0, [50, 82, 82]), ("lora", 1, [50, 60, 80]))
    convs = {c.key.method: cell_convergence(c) for c in cells}
    vs = versus_full(convs["lora"], convs["full"])
    assert not vs.paired and vs.samples_ratios == [2.0]


def test_score_ratio_is_undefined_for_a_non_positive_full_score():
    records = [make_record(task="cola", method="full", scores=[-10, -2, 0], test=-1.0),
               make_record(task="cola", method="lora", scores=[-10, -5, -3], test=-4.0)]
    (vs,) = analyse(build_cells(records))[1]
    assert vs.score_ratio is None and vs.score_diff == pytest.approx(-3.0)


def test_claim_supported_not_supported_and_insufficient_data():
    slow = [50, 60, 70, 78, 80]
    fast = [50, 79, 80, 80, 80]
    records = [make_record(method="full", train_size=100, scores=fast),
               make_record(method="lora", train_size=100, scores=slow),
               make_record(method="ia3", train_size=100, scores=slow),
               make_record(method="bitfit", train_size=100, scores=fast),
               make_record(method="full", train_size=1000, scores=slow),
               make_record(method="lora", train_size=1000, scores=fast),
               make_record(method="ia3", train_size=1000, scores=fast),
               # no full fine-tuning at 5000
               make_record(method="lora", train_size=5000, scores=fast)]
    cells = build_cells(records)
    _, versus = analyse(cells)
    verdicts = {v.train_size: v for v in check_claim(cells, versus, Scales().of)}
    low = verdicts[100]
    assert low.scale == "low" and low.verdict == "supported"
    assert sorted(low.slower) == ["ia3", "lora"] and low.not_slower == ["bitfit"]
    assert verdicts[1000].verdict == "not supported" and verdicts[1000].scale == "medium"
    assert verdicts[5000].verdict == "insufficient data"
    assert "no full fine-tuning baseline" in verdicts[5000].reason


def test_a_seed_where_full_fine_tuning_never_converged_is_counted_apart():
    from peftbench.analysis.convergence import VersusFull

    vs = VersusFull(peft=None, full=None, threshold=0.95, samples_ratios=[0.0, 2.0, math.inf],
                    seconds_ratios=[0.0, 3.0, math.inf], paired=True, undetermined=0,
                    score_ratio=None, score_diff=None)
    assert (vs.samples_ratio.mean, vs.full_never, vs.never_ratios) == (2.0, 1, 1)
    assert vs.seconds_ratio.mean == 3.0  # not (0 + 3) / 2
