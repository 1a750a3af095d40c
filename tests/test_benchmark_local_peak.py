"""The throughput benchmark's local peak (``--local-peak``): the matmul peak measured in each
timed worker after its warm-up and after each repetition, outside the timed steps, and MFU
against the higher of the two around each repetition."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import throughput_metrics
from throughput_metrics import local_peak, rep_stats
from throughput_worker import StepClock, WorkerConfig

PARAMS = {"total": 1000, "trainable": 10, "body": 800, "head": 200}


def _run(*peaks: tuple[float | None, float | None]) -> dict:
    reps = [{"seconds": 2.0, "tokens": 100, "targets": 50, "positions": 100,
             "peak_before_gflops": before, "peak_after_gflops": after}
            for before, after in peaks]
    return {"reps": reps, "params": PARAMS}


def test_each_repetition_is_measured_against_the_higher_peak_next_to_it():
    stats = rep_stats(_run((100.0, 80.0), (80.0, 90.0), (None, 50.0)), False, 200.0)
    achieved = (4 * 1000 + 2 * 10) * 100 / 2.0 / 1e9  # GFLOP/s of each repetition
    assert [r["local_peak_gflops"] for r in stats["reps"]] == [100.0, 90.0, 50.0]
    assert [r["mfu_local"] for r in stats["reps"]] == pytest.approx(
        [achieved / 100, achieved / 90, achieved / 50])
    assert stats["mfu_local"] == pytest.approx(achieved / 90)  # the median
    assert stats["mfu"] == pytest.approx(achieved / 200)  # the table-wide peak, unchanged


def test_without_local_peaks_there_is_no_local_mfu():
    assert local_peak({"seconds": 1.0}) is None
    assert local_peak({"peak_before_gflops": None, "peak_after_gflops": None}) is None
    assert rep_stats(_run((None, None)), False, 200.0)["mfu_local"] is None


def _slow_peaks(monkeypatch) -> list[dict]:
    """matmul_peak_gflops replaced by one that takes 0.3 s and returns 101, 102, ... GFLOP/s;
    returns the list of its calls' arguments."""
    calls: list[dict] = []

    def slow_peak(**kwargs):
        calls.append(kwargs)
        time.sleep(0.3)
        return {"gflops_best": 100.0 + len(calls)}

    monkeypatch.setattr(throughput_metrics, "matmul_peak_gflops", slow_peak)
    return calls


def _timed(cfg: WorkerConfig) -> dict:
    """The clock's summary of cfg's steps, each 20 ms long."""
    clock = StepClock(cfg, 0, False, None)
    clock.begin()
    for _ in range(cfg.total_steps):
        clock.add_counts((10, 5, 10))
        time.sleep(0.02)
        clock.step_end()
    return clock.summary()


def test_the_clock_measures_the_peak_at_each_boundary_outside_the_timed_steps(monkeypatch):
    calls = _slow_peaks(monkeypatch)
    size = {"dtype_name": "bf16", "n": 64, "reps": 1}
    summary = _timed(WorkerConfig(model="m", task="t", method="lora", variant="peftbench",
                                  warmup=1, reps=2, steps=2, rep_peak=size))
    assert calls == [size] * 3  # after the warm-up and after each of the two repetitions
    reps = summary["reps"]
    assert [(r["peak_before_gflops"], r["peak_after_gflops"]) for r in reps] == [
        (101.0, 102.0), (102.0, 103.0)]
    assert all(0.04 <= r["seconds"] < 0.25 for r in reps), reps  # the 0.3 s are not timed
    assert all(s < 0.25 for s in summary["step_seconds"]), summary["step_seconds"]


def test_without_warm_up_the_first_peak_is_measured_before_the_first_step(monkeypatch):
    _slow_peaks(monkeypatch)
    summary = _timed(WorkerConfig(model="m", task="t", method="lora", variant="peftbench",
                                  warmup=0, reps=1, steps=2,
                                  rep_peak={"dtype_name": "bf16", "n": 64}))
    rep = summary["reps"][0]
    assert (rep["peak_before_gflops"], rep["peak_after_gflops"]) == (101.0, 102.0)
    assert 0.04 <= rep["seconds"] < 0.25, rep


def test_without_the_option_the_clock_measures_nothing(monkeypatch):
    monkeypatch.setattr(throughput_metrics, "matmul_peak_gflops",
                        lambda **kwargs: pytest.fail("measured a peak"))
    summary = _timed(WorkerConfig(model="m", task="t", method="lora", variant="peftbench",
                                  warmup=1, reps=1, steps=1))
    assert "peak_before_gflops" not in summary["reps"][0]
