"""Run one RunSpec in a process of its own and bring its result record back.

Isolation: a crash, an out-of-memory kill or a hung library takes down only that run's
process, and the run's peak memory is its own. Processes are forked from a *fork server*
that imported torch, transformers and peft once (multiprocessing's ``forkserver`` with a
preload), so a run starts in milliseconds instead of the ~5 s those imports cost.

The child streams its training events (``{"type": "step" | "eval", ...}``) through a pipe
and writes ``result.json`` (via :func:`peftbench.training.runner.execute`); the parent reads
that file back. A child that dies without writing it becomes a ``failed`` record saying how
it died, with the tail of its log (``worker.log`` in the run folder).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from peftbench.config import RunSpec
from peftbench.errors import CrashError
from peftbench.files import write_json_atomic

Event = dict[str, Any]
EventSink = Callable[[Event], None]

_PRELOAD = ["peftbench.sweep.forkserver_guard", "peftbench.training.runner"]
_context: Any = None
_live: set[mp.process.BaseProcess] = set()
_live_lock = threading.Lock()


def _fork_context() -> Any:
    """The fork-server context, preloading the training stack (once per process)."""
    global _context
    if _context is None:
        # a CUDA check during the preload must not initialise CUDA: children could not use it
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        _context = mp.get_context("forkserver")
        # inside a Ray worker, children re-import its __main__, which imports ray
        _context.set_forkserver_preload(_PRELOAD + (["ray"] if "ray" in sys.modules else []))
    return _context


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the child -------------------------------------------------------------------------------
def restore_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the fork server ignores it, see
    :mod:`peftbench.sweep.forkserver_guard`)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the fork server) goes away."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def _child(spec_json: str, out_dir: str, threads: int | None, environ: dict[str, str],
           events: Connection) -> None:
    """Entry point of a run's process: train, stream events, write result.json.

    ``environ`` is the parent's environment at launch (the fork server's is older: a Ray
    worker, for one, gets CUDA_VISIBLE_DEVICES set per task)."""
    restore_interrupts()
    _die_with_parent()
    os.environ.clear()
    os.environ.update(environ)
    log = os.open(Path(out_dir) / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # library chatter goes to the run's log, not over the progress display
    os.dup2(log, 2)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from peftbench.training.runner import execute

    def emit(event: Event) -> None:
        try:
            events.send(event)
        except OSError:  # the sweep is gone: stop at once, leave no result behind
            os._exit(1)

    spec = RunSpec.model_validate_json(spec_json)
    execute(spec, Path(out_dir), on_event=emit, raise_usage_errors=False)
    events.close()


# -- the parent ------------------------------------------------------------------------------
def failed_record(spec: RunSpec, error: str, started_at: str | None = None) -> dict[str, Any]:
    """A result record for a run that died before it could write its own."""
    return {
        "run": {"hash": spec.run_hash(), "config": spec.model_dump(),
                "started_at": started_at or _now(), "finished_at": _now()},
        "status": "failed",
        "error": error,
        "params": {},
        "curve": [],
        "scores": {"val": None, "test": None, "primary": None},
        "efficiency": {},
        "provenance": {},
    }


def write_result(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``result.json`` atomically (temporary file + rename)."""
    write_json_atomic(out_dir / "result.json", record)


def _read_result(out_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    try:
        record = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("run", {}).get("hash") != spec.run_hash():
        return None
    return record


def _how_it_died(exitcode: int | None) -> str:
    """``killed by SIGKILL (out of memory?)`` or ``exited with code N``."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() \
            else str(-exitcode)
        return f"killed by {name}" + (" (out of memory?)" if exitcode == -signal.SIGKILL
                                      else "")
    return f"exited with code {exitcode}"


def _death(exitcode: int | None, out_dir: Path) -> str:
    what = f"the run's process {_how_it_died(exitcode)}"
    if exitcode is None or exitcode >= 0:
        what += " without a result"
    try:
        tail = (out_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-15:]
    except OSError:
        tail = []
    return what + (". Last lines of worker.log:\n" + "\n".join(tail) if tail else "")


# what a run writes into its folder (plus the temporaries of an interrupted write)
RUN_ENTRIES = frozenset({"result.json", "worker.log", "adapter"})
RUN_TEMPORARIES = (".adapter.", ".adapter-old.", ".result.json.")


def _written_by_a_run(name: str) -> bool:
    return name in RUN_ENTRIES or name.startswith(RUN_TEMPORARIES)


def foreign_entries(out_dir: Path) -> list[str]:
    """What a run folder holds that no peftbench run wrote (the folder itself, when it is a
    file or cannot be listed): a run clears its folder of its own entries only, and these
    would be mixed in."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return [out_dir.name] if out_dir.exists() or out_dir.is_symlink() else []
    try:
        return sorted(e.name for e in out_dir.iterdir() if not _written_by_a_run(e.name))
    except OSError as exc:
        return [f"{out_dir.name} (cannot be listed: {exc.strerror or exc})"]


def clear_run_folder(out_dir: Path) -> None:
    """Remove an earlier attempt's entries (``RUN_ENTRIES`` and temporaries), nothing else."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if not _written_by_a_run(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def run_isolated(spec: RunSpec, out_dir: Path, on_event: EventSink | None = None,
                 threads: int | None = None,
                 stop: threading.Event | None = None) -> dict[str, Any] | None:
    """Run ``spec`` in its own process into ``out_dir`` (an earlier attempt's files removed
    first, see :func:`clear_run_folder`); return its record.

    ``threads``: torch threads of the run. Returns ``None`` once ``stop`` is set (the sweep
    is aborting, see :func:`kill_all`): an interrupted run has no result and is redone.
    """
    stop = stop or threading.Event()
    if stop.is_set():
        return None

    def emit(event: Event) -> None:
        if on_event is not None:
            with contextlib.suppress(Exception):  # a display problem must not fail the run
                on_event(event)

    out_dir = Path(out_dir).resolve()
    clear_run_folder(out_dir)  # leftovers of an interrupted attempt; nothing of anyone else
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _now()
    context = _fork_context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child, name=f"peftbench-run-{spec.run_hash()}",
                              args=(spec.model_dump_json(), str(out_dir), threads,
                                    dict(os.environ), writer),
                              daemon=True)
    try:
        with _live_lock:
            process.start()
            _live.add(process)
    except Exception as exc:  # e.g. the fork server could not import the training stack
        record = failed_record(spec, f"could not start the run's process: {exc}", started)
        write_result(out_dir, record)
        return record
    finally:
        writer.close()
    emit({"type": "start", "spec": spec.model_dump()})
    try:
        while True:
            try:
                emit(reader.recv())
            except (EOFError, OSError):
                break
        process.join()
    finally:
        reader.close()
        with _live_lock:
            _live.discard(process)
    if stop.is_set():
        return None
    record = _read_result(out_dir, spec)
    if record is None:
        record = failed_record(spec, _death(process.exitcode, out_dir), started)
        write_result(out_dir, record)
    return record


def _call_child(function: Callable[..., Any], args: tuple, result: Connection) -> None:
    # Ctrl-C stays ignored here (as in the fork server): the caller gets it and kills us
    try:
        outcome = (True, function(*args))
    except BaseException as exc:
        outcome = (False, exc)
    with contextlib.suppress(OSError):  # the caller is gone: nobody to tell
        result.send(outcome)


def call_in_fork_server(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a child of the fork server (whose imports are done): the
    caller never imports torch itself. Exceptions are re-raised here; an interrupted
    caller kills the child."""
    context = _fork_context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_call_child, args=(function, args, writer), daemon=True)
    try:
        process.start()
        writer.close()
        ok, value = reader.recv()
    except EOFError:
        process.join()
        raise CrashError(f"{function.__name__}: its process {_how_it_died(process.exitcode)}; "
                         "run the command again") from None
    except BaseException:
        if process.pid is not None:
            process.kill()
        raise
    finally:
        writer.close()
        reader.close()
        if process.pid is not None:
            process.join()
    if not ok:
        raise value
    return value


def kill_all() -> None:
    """Kill every run process of this process (set the runs' ``stop`` event first)."""
    with _live_lock:
        for process in _live:
            with contextlib.suppress(Exception):
                process.kill()
