"""Local backend: up to ``workers`` runs at a time, each in its own process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from peftbench.sweep.plan import PlannedRun
from peftbench.sweep.worker import failed_record, kill_all, run_isolated

RunEventSink = Callable[[str, dict[str, Any]], None]  # (run_hash, event)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_local(runs: Sequence[PlannedRun], on_event: RunEventSink, workers: int = 1,
              threads: int | None = None) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    """Yield ``(run, record)`` as runs finish. ``threads``: torch threads per run (default:
    the CPUs shared among the workers). Closing the generator early (Ctrl-C) kills the
    runs in progress; they leave no record."""
    threads = threads or max(1, available_cpus() // workers)
    stop = threading.Event()

    def one(run: PlannedRun) -> dict[str, Any] | None:
        try:
            return run_isolated(run.spec, run.out_dir, lambda e: on_event(run.run_hash, e),
                                threads, stop)
        except Exception as exc:  # e.g. the run folder cannot be created
            return failed_record(run.spec, f"{type(exc).__name__}: {exc}")

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peftbench-run")
    futures: dict[Future, PlannedRun] = {pool.submit(one, run): run for run in runs}
    order = {future: index for index, future in enumerate(futures)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=order.__getitem__):
                record = future.result()
                if record is not None:
                    yield futures[future], record
    finally:
        if pending:
            stop.set()
            for future in pending:
                future.cancel()
            kill_all()
        pool.shutdown(wait=True)
