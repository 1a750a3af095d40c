"""``peftbench run`` (a suite, into the results store) and ``peftbench results`` (export)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftbench.config import compact
from peftbench.errors import UsageError
from peftbench.files import require_folder, require_input_folder
from peftbench.store import DEFAULT_DB, ResultStore, RunLock, flat_row, write_csv, write_json
from peftbench.sweep.plan import PlannedRun
from peftbench.text import count

console = Console(soft_wrap=True, emoji=False)
# when piped, rich assumes 80 columns: let tables be as wide as their content instead
table_console = console if console.is_terminal else Console(width=240, emoji=False)
FORMATS = ("table", "csv", "json")


def run(
    suite: Annotated[str, typer.Argument(
        help="a shipped suite (smoke, quickstart, selective, paper) or the path to a suite "
             "YAML")
    ] = "quickstart",
    db: Annotated[Path, typer.Option(help="results database (SQLite), created if missing")
                  ] = Path(DEFAULT_DB),
    backend: Annotated[str, typer.Option(help="local | ray")] = "local",
    workers: Annotated[int | None, typer.Option(
        min=1, help="runs at a time (default: the suite's execution.workers, else 1 for "
                    "local, as resources allow for ray)")
    ] = None,
    cpus_per_run: Annotated[int | None, typer.Option(
        min=1, help="CPU threads per run (default: the suite's execution.cpus_per_run, "
                    "else CPUs / workers for local, 1 for ray)")
    ] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="address of a running Ray cluster (default: start a local Ray)")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        help="folder for the runs' adapters and result.json, one subfolder per run hash "
             "(default: runs/<suite>)")] = None,
    model: Annotated[str | None, typer.Option(
        help="run the suite on this model instead of its own")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder with the tasks' data files")
                        ] = None,
    dry_run: Annotated[bool, typer.Option(
        help="check the suite, list its runs and what is stored; run nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no live progress display")] = False,
) -> None:
    """Run a suite: every run not yet done, each in its own process; results into --db.

    Completed and diverged runs are final and skipped next time; failed and interrupted
    runs are redone. Exit status: 0 no run failed; 10 + N when N runs failed (at most
    110); 2 bad suite or option (nothing run); 130 interrupted.
    """
    from peftbench.sweep import execute_runs, expand, load_suite, plan_runs
    from peftbench.sweep.driver import BACKENDS, exit_code, runs_to_do
    from peftbench.sweep.preflight import check_runnable
    from peftbench.sweep.progress import SweepProgress
    from peftbench.sweep.worker import call_in_fork_server

    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if ray_address and backend != "ray":
        raise UsageError("--ray-address needs --backend ray.")
    if backend == "ray":
        from peftbench.sweep.ray_backend import check_ray_address, require_ray

        require_ray()
        if ray_address:
            check_ray_address(ray_address)
    if data_dir is not None:
        require_input_folder(data_dir, "--data-dir", "the tasks' data files")
    loaded = load_suite(suite)
    name = loaded.spec.name
    workers = workers or loaded.spec.execution.workers
    cpus_per_run = cpus_per_run or loaded.spec.execution.cpus_per_run
    specs = expand(loaded, model=model,
                   data_dir=str(data_dir.expanduser().resolve()) if data_dir else None)
    out_root = out_dir or Path("runs") / name
    require_folder(out_root, "--out-dir", create=not dry_run)
    runs = plan_runs(specs, out_root)

    def check(planned: list[PlannedRun]) -> None:
        # unknown names, models or data, train sizes beyond the data: exit 2 before anything
        # runs. Checked in the runs' fork server, which imports torch & co. once for all.
        call_in_fork_server(check_runnable, loaded, [run.spec for run in planned], model,
                            backend == "local")

    if dry_run:
        check(runs)
        statuses: dict[str, str] = {}
        if db.is_dir() or (db.is_file() and db.stat().st_size):  # creates, changes nothing
            with ResultStore(db, must_exist=True) as store:
                statuses = store.statuses(run.run_hash for run in runs)
        _print_plan(statuses, runs)
        return
    # one `run` per database at a time (a dry run only reads: it needs no lock)
    with ResultStore(db) as store, RunLock(db):
        todo = runs_to_do(store, runs)
        if todo:
            check(todo)
            check_run_folders(todo)
        store.add_to_suite(name, [run.run_hash for run in runs])
        failed: list[tuple[PlannedRun, dict]] = []
        progress = SweepProgress(console, f"suite {name}" + (f" on {model}" if model else ""),
                                 todo, skipped=len(runs) - len(todo), enabled=not quiet)

        def finished(run: PlannedRun, record: dict) -> None:
            progress.finished(run, record)
            if record["status"] == "failed":
                failed.append((run, record))

        try:
            with progress:
                counts = execute_runs(todo, store, name, backend=backend, workers=workers,
                                      cpus_per_run=cpus_per_run, ray_address=ray_address,
                                      on_event=progress.event, on_finished=finished)
        except KeyboardInterrupt:
            console.print(f"interrupted: {count(sum(progress.counts.values()), 'run')} "
                          "stored this time; the runs in progress left no result. Run the "
                          "suite again to finish it.")
            sys.exit(130)
    ran = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
    console.print(f"[bold]{escape(name)}[/]: {count(len(runs), 'run')}, "
                  f"{len(runs) - len(todo)} already done; this time: {ran}.", highlight=False)
    for run, record in failed:
        first = (record.get("error") or "?").splitlines()[0]
        console.print(f"[red]failed[/] {escape(run.long_label)} ({run.run_hash}): "
                      f"{escape(first)}",
                      highlight=False)
    console.print(f"results: peftbench results --db {escape(shlex.quote(str(db)))} --suite "
                  f"{escape(shlex.quote(name))}", highlight=False)
    code = exit_code(len(failed))
    if code:
        # SystemExit, not typer.Exit: in non-standalone mode (cli.main) click returns the
        # code of a typer.Exit instead of exiting with it
        sys.exit(code)


def check_run_folders(todo: list[PlannedRun]) -> None:
    """A usage error when a run's folder holds files no peftbench run wrote: the run would
    mix its results in with them (its own earlier attempt's files it replaces)."""
    from peftbench.sweep.worker import foreign_entries

    crowded = [(run, found) for run in todo if (found := foreign_entries(run.out_dir))]
    if not crowded:
        return
    shown = "; ".join(f"{run.out_dir}: {', '.join(found[:3])}" + (" ..." if len(found) > 3
                                                                  else "")
                      for run, found in crowded[:3])
    more = f" (and {len(crowded) - 3} more run folders)" if len(crowded) > 3 else ""
    verb = "holds" if len(crowded) == 1 else "hold"
    raise UsageError(f"--out-dir: {count(len(crowded), 'run folder')} to be written {verb} "
                     f"files peftbench did not write: {shown}{more}. Move them away, or give "
                     "another --out-dir.")


def _print_plan(statuses: dict[str, str], runs: list[PlannedRun]) -> None:
    table = Table("#", "run", "hash", "stored", title=count(len(runs), "run"))
    for index, run in enumerate(runs, 1):
        status = statuses.get(run.run_hash, "-")
        table.add_row(str(index), escape(run.long_label), run.run_hash, status)
    table_console.print(table)


def results(
    db: Annotated[Path, typer.Option(
        help="results database (SQLite), or a JSON file of run records")] = Path(DEFAULT_DB),
    format: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    suite: Annotated[str | None, typer.Option(help="only the runs of this suite")] = None,
) -> None:
    """Export stored results: a table, CSV (one line per run) or JSON (full run records)."""
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}.")
    if db.suffix.lower() == ".json":  # `results --format json` output, or a reference file
        from peftbench import reference

        if suite is not None:
            raise UsageError("--suite selects runs in a results database (--db *.sqlite); "
                             "JSON results have no suites.")
        _export(reference.read(db).runs, format)
        return
    with ResultStore(db, must_exist=True) as store:
        if suite is not None and suite not in store.suites():
            known = ", ".join(store.suites()) or "none yet"
            raise UsageError(f"--suite {suite!r}: no such suite in {db} (suites: {known}).")
        records = store.records(suite)
    _export(records, format)


def _export(records: list[dict], format: str) -> None:
    if format == "json":
        write_json(records, sys.stdout)
    elif format == "csv":
        write_csv(records, sys.stdout)
    else:
        _print_table(records)


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_table(records: list[dict]) -> None:
    table = Table("model", "task", "method", "args", "n", "seed", "lr", "status", "metric",
                  "val", "test", "train %", "train s", title=count(len(records), "run"),
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for record in records:
        row = flat_row(record)
        colour = {"completed": "green", "diverged": "yellow"}.get(row["status"], "red")
        args = json.loads(row["method_args"])
        table.add_row(escape(str(row["model"])), escape(str(row["task"])), row["method"],
                      escape(" ".join(f"{k}={compact(v)}" for k, v in args.items()) or "-"),
                      _fmt(row["train_size"] or "all"), _fmt(row["seed"]),
                      "-" if row["lr"] is None else f"{row['lr']:g}",
                      f"[{colour}]{row['status']}[/]", _fmt(row["primary_metric"]),
                      _fmt(row["val_score"]), _fmt(row["test_score"]),
                      _fmt(row["trainable_pct"], 3), _fmt(row["train_seconds"], 1))
    table_console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``results`` to the ``peftbench`` app."""
    app.command("run")(run)
    app.command("results")(results)
