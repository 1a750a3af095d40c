"""Live display of a sweep: runs done / total with ETA, and each run in progress
(step, loss, last validation score); one line per finished run."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from peftbench.sweep.plan import PlannedRun

_MARK = {"completed": "[green]✓[/]", "diverged": "[yellow]~[/]", "failed": "[red]✗[/]"}


def _score_text(record: dict[str, Any]) -> str:
    scores = record.get("scores") or {}
    metric = scores.get("primary")
    if not metric:
        return ""
    values = [scores.get(split) or {} for split in ("val", "test")]
    shown = [f"{v[metric]:.2f}" if isinstance(v.get(metric), int | float) else "-"
             for v in values]
    return f"{metric} val/test {shown[0]}/{shown[1]}"


class SweepProgress:
    """Context manager; :meth:`event` is the executors' event sink (thread-safe)."""

    def __init__(self, console: Console, title: str, runs: Sequence[PlannedRun],
                 skipped: int = 0, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=10),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(compact=True),
            console=console, disable=not enabled, speed_estimate_period=3600)
        done = f" ({skipped} already done)" if skipped else ""
        self.sweep = self.progress.add_task(f"[bold]{escape(title)}[/]{done}",
                                            total=len(runs), info=f"0/{len(runs)} runs")
        self.total = len(runs)
        self.labels = {run.run_hash: run.label for run in runs}
        self.rows: dict[str, TaskID] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def event(self, run_hash: str, event: dict[str, Any]) -> None:
        with self.lock:
            if run_hash not in self.rows:
                label = escape(self.labels.get(run_hash, run_hash))
                self.rows[run_hash] = self.progress.add_task(f"  {label}", total=None,
                                                             info="starting")
                self.state[run_hash] = {"loss": "-", "val": "-"}
            state = self.state[run_hash]
            if event.get("type") not in ("step", "eval"):
                return
            if event["type"] == "step":
                state["loss"] = f"{event['loss']:.3f}"
            else:
                state["val"] = f"{event['val_score']:.1f}"
            self.progress.update(
                self.rows[run_hash], completed=event["step"], total=event["total"],
                info=f"{event['step']}/{event['total']} loss {state['loss']} "
                     f"val {state['val']}")

    def finished(self, run: PlannedRun, record: dict[str, Any]) -> None:
        with self.lock:
            row = self.rows.pop(run.run_hash, None)
            self.state.pop(run.run_hash, None)
            if row is not None:
                self.progress.remove_task(row)
            status = record["status"]
            self.counts[status] += 1
            done = sum(self.counts.values())
            failed = f", {self.counts['failed']} failed" if self.counts["failed"] else ""
            self.progress.update(self.sweep, completed=done,
                                 info=f"{done}/{self.total} runs{failed}")
            if not self.enabled:
                return
            seconds = record.get("run", {}).get("wall_seconds")
            took = f"  {seconds:.1f} s" if isinstance(seconds, int | float) else ""
            line = (f"{_MARK.get(status, status)} {escape(run.long_label)}  "
                    f"{_score_text(record)}{took}")
            if status != "completed" and record.get("error"):
                line += f"\n    [dim]{status}: {escape(record['error'].splitlines()[0])}[/]"
            self.progress.console.print(line, highlight=False)
