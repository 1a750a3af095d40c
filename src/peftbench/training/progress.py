"""Live progress of one run: a rich bar with the step, the loss and the last validation score."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Context manager; pass :meth:`update` as the run's event sink."""

    def __init__(self, console: Console, enabled: bool = True, label: str = "training") -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            disable=not enabled)
        self.task_id = self.progress.add_task(label, total=None, loss="-", val="-")
        self.stepped = False

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # a run that ended before its first step (a setup error) leaves no empty bar
        # ("step 0/None") above its message
        self.progress.live.transient = not self.stepped
        self.progress.stop()

    def update(self, event: dict[str, Any]) -> None:
        self.stepped = True
        fields: dict[str, Any] = {"total": event["total"], "completed": event["step"]}
        if event["type"] == "step":
            fields["loss"] = f"{event['loss']:.4f}"
        else:
            fields["val"] = f"{event['val_score']:.2f}"
        self.progress.update(self.task_id, **fields)
