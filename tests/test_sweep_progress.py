"""The sweep display: runs in progress come and go, finished runs print one line each."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from peftbench.config import RunSpec
from peftbench.sweep.driver import exit_code
from peftbench.sweep.plan import PlannedRun, plan_runs
from peftbench.sweep.progress import SweepProgress
from peftbench.sweep.worker import failed_record


def test_progress_follows_runs_and_prints_one_line_per_finished_run(tmp_path):
    runs = [PlannedRun(RunSpec(model="m", task="toy_cls", method=method, train_size=64, lr=0.01),
                       Path(tmp_path) / method) for method in ("lora", "bitfit")]
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with SweepProgress(console, "suite t", runs, skipped=3) as progress:
        lora, bitfit = runs
        progress.event(lora.run_hash, {"type": "start"})
        progress.event(lora.run_hash, {"type": "step", "step": 1, "total": 4, "loss": 2.5})
        progress.event(lora.run_hash, {"type": "eval", "step": 1, "total": 4, "val_score": 51.0})
        assert len(progress.rows) == 1
        record = {"run": {"wall_seconds": 1.5}, "status": "completed", "error": None,
                  "scores": {"primary": "accuracy", "val": {"accuracy": 51.0},
                             "test": {"accuracy": 50.0}}}
        progress.finished(lora, record)
        progress.finished(bitfit, failed_record(bitfit.spec, "boom\ndetails"))
        assert progress.rows == {} and progress.counts == {"completed": 1, "failed": 1}
    text = out.getvalue()
    assert "lora          m/toy_cls n=64 s=0 lr=0.01  accuracy val/test 51.00/50.00  1.5 s" \
        in text
    assert "failed: boom" in text and "details" not in text
    assert "(3 already done)" in text and "2/2 runs, 1 failed" in text


def test_exit_code_counts_failed_runs_apart_from_usage_errors():
    assert exit_code(0) == 0
    assert exit_code(1) == 11 and exit_code(7) == 17
    assert exit_code(5000) == 110


def test_variants_of_one_method_have_different_labels(tmp_path):
    runs = plan_runs([RunSpec(model="m", task="toy_cls", method="lora", train_size=64,
                              method_args=args)
                      for args in ({}, {"layers_to_transform": "-10:"},
                                   {"target_modules": ["q_proj", "v_proj"]})], tmp_path)
    assert [r.long_label.split("s=0")[1] for r in runs] == [
        "", " layers_to_transform=-10:", " target_modules=[q_proj,v_proj]"]
