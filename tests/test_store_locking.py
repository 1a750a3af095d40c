"""One `peftbench run` per results database: a second is refused at once, naming the first;
a killed run's lock file blocks nobody; reading commands and dry runs need no lock."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_in_process import run_main
from peftbench.errors import UsageError
from peftbench.store import ResultStore, RunLock
from peftbench.store.lock import lock_path
from test_store_db import make_record
from test_sweep_run import tiny_suite

HOLD = ("import sys; from peftbench.store import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read()")


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    code, out, err = run_main(capsys, monkeypatch, *args)
    return code, out, " ".join(err.split())  # rich wraps long errors


@pytest.fixture()
def holder(tmp_path, monkeypatch) -> Iterator[subprocess.Popen]:
    """Another process holding the run lock of ``tmp_path / r.sqlite`` (a stored run in it)."""
    monkeypatch.chdir(tmp_path)
    with ResultStore("r.sqlite") as store:
        store.save(make_record(), suite="earlier")
    process = subprocess.Popen([sys.executable, "-c", HOLD, "r.sqlite"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_on_the_same_db_is_refused_at_once(capsys, monkeypatch, tmp_path,
                                                        holder):
    suite = tiny_suite(tmp_path, methods="[bitfit]")
    code, out, err = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite",
                         "--quiet")
    assert code == 2, out + err
    assert re.fullmatch(rf"error: --db r.sqlite is in use by another `peftbench run` "
                        rf"\(pid {holder.pid}, started [-\d ]*\d\d:\d\d\); wait for it to finish "
                        r"or give another --db\.", err), err
    assert list((tmp_path / "runs" / "tiny").iterdir()) == []  # no run was started
    with ResultStore("r.sqlite", must_exist=True) as store:
        assert [r["run"]["hash"] for r in store.records()] == ["abc123"]


def test_reading_commands_and_dry_runs_need_no_lock(capsys, monkeypatch, tmp_path, holder):
    code, out, err = cli(capsys, monkeypatch, "results", "--db", "r.sqlite", "--format", "csv")
    assert code == 0 and "abc123" in out, err
    suite = tiny_suite(tmp_path, methods="[bitfit]")
    code, out, err = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite",
                         "--dry-run")
    assert code == 0 and "1 run" in out, err


def test_a_killed_runs_lock_file_does_not_block_the_next_run(capsys, monkeypatch, tmp_path,
                                                             holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path("r.sqlite").exists()  # left behind, still naming the dead process
    suite = tiny_suite(tmp_path, methods="[bitfit]")
    code, out, err = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite",
                         "--quiet")
    assert code == 0 and "this time: 1 completed" in out, out + err
    assert not lock_path("r.sqlite").exists()  # a finished run removes its lock file


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    db = tmp_path / "r.sqlite"
    with RunLock(db), pytest.raises(UsageError, match=rf"\(pid {os.getpid()}, started "):
        RunLock(db).acquire()  # flock: refused within one process too
    assert not lock_path(db).exists()
    with RunLock(db):
        assert lock_path(db).exists()


def test_a_lock_file_that_cannot_be_made_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot create its lock file"):
        RunLock(Path("/proc/peftbench-test/r.sqlite")).acquire()
