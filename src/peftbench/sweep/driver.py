"""A sweep: skip what is already done, run the rest on a backend, store every result.

Completed and diverged runs are final results and are skipped when the suite runs again;
failed runs are retried; runs that were interrupted have no row and are simply redone.
Only the driver (this process) writes the store, one transaction per finished run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from peftbench.errors import UsageError
from peftbench.store import ResultStore
from peftbench.sweep.local import RunEventSink, run_local
from peftbench.sweep.plan import PlannedRun

BACKENDS = ("local", "ray")
# exit status of `peftbench run` when runs failed: FAILED_EXIT_BASE + min(failed, 100)
FAILED_EXIT_BASE = 10


def exit_code(failed: int) -> int:
    """0 when no run failed, else 10 + the number of failed runs (at most 110).

    Distinct from 1 (crash), 2 (usage error) and 130 (interrupted)."""
    return 0 if failed == 0 else FAILED_EXIT_BASE + min(failed, 100)


def runs_to_do(store: ResultStore, runs: Sequence[PlannedRun]) -> list[PlannedRun]:
    """The runs without a final result in the store (never run, failed or interrupted)."""
    final = store.final_hashes(run.run_hash for run in runs)
    return [run for run in runs if run.run_hash not in final]


def _results(runs: Sequence[PlannedRun], backend: str, on_event: RunEventSink,
             workers: int | None, cpus_per_run: int | None, ray_address: str | None
             ) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    if backend == "local":
        return run_local(runs, on_event, workers=workers or 1, threads=cpus_per_run)
    if backend == "ray":
        from peftbench.sweep.ray_backend import run_ray

        return run_ray(runs, on_event, address=ray_address, workers=workers,
                       cpus_per_run=cpus_per_run or 1)
    raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}.")


def execute_runs(runs: Sequence[PlannedRun], store: ResultStore, suite: str,
                 backend: str = "local", workers: int | None = None,
                 cpus_per_run: int | None = None, ray_address: str | None = None,
                 on_event: RunEventSink | None = None,
                 on_finished: Callable[[PlannedRun, dict[str, Any]], None] | None = None
                 ) -> Counter[str]:
    """Run ``runs`` and store each record as it arrives; return the count per status."""
    counts: Counter[str] = Counter()
    if not runs:
        return counts
    results = _results(runs, backend, on_event or (lambda run_hash, event: None), workers,
                       cpus_per_run, ray_address)
    with contextlib.closing(results):  # Ctrl-C: stops the runs still in progress
        for run, record in results:
            store.save(record, suite=suite)
            counts[record["status"]] += 1
            if on_finished:
                on_finished(run, record)
    return counts
