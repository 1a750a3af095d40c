"""The SQLite results store: round trip, replace semantics, atomic writes, export."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sqlite3
import threading

import pytest

from cli_in_process import run_main
from peftbench.errors import UsageError
from peftbench.store import ResultStore, db, flat_row, write_csv, write_json
from peftbench.store.schema import SCHEMA_VERSION


def make_record(run_hash: str = "abc123", status: str = "completed", method: str = "lora",
                seed: int = 0, points: int = 3) -> dict:
    """A record shaped like the one ``training.runner.execute`` writes."""
    return {
        "run": {"hash": run_hash,
                "config": {"model": "tiny-random-llama", "task": "toy_cls", "method": method,
                           "method_args": {}, "train_size": 64, "seed": seed, "lr": 0.01},
                "started_at": "2026-01-01T00:00:00+00:00",
                "finished_at": "2026-01-01T00:00:05+00:00", "lr": 0.01, "total_steps": 10,
                "wall_seconds": 5.0},
        "status": status,
        "error": None if status == "completed" else "boom",
        "params": {"trainable": 10, "total": 100, "trainable_pct": 10.0},
        "curve": [{"step": 5 * i, "samples": 80 * i, "seconds": 0.5 * i,
                   "train_loss": None if i == 0 else 2.0 / i, "val_score": 50.0 + i}
                  for i in range(points)],
        "scores": {"val": {"accuracy": 52.0, "primary": "accuracy", "n": 16},
                   "test": {"accuracy": 51.0, "primary": "accuracy", "n": 16},
                   "primary": "accuracy", "best_step": 10},
        "efficiency": {"train_seconds": 1.5, "eval_seconds": 0.5, "tokens_per_second": 1e3,
                       "train_tokens": 1500, "peak_rss_mb": 400.0, "peak_gpu_mb": None,
                       "adapter_bytes": 1234},
        "provenance": {"versions": {"torch": "2.x"}, "git_sha": None},
        "task": {"name": "toy_cls", "type": "classification", "primary_metric": "accuracy"},
        "model": {"name": "tiny-random-llama", "pretrained": False},
    }


@pytest.fixture()
def store(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as opened:
        yield opened


def test_record_round_trip_keeps_every_key(store):
    record = make_record()
    record["traceback"] = "Traceback ..."  # an extra top-level key
    record["curve"][1]["note"] = "extra curve key"
    store.save(record, suite="s")
    assert store.get("abc123") == json.loads(json.dumps(record))
    assert store.records("s") == [record]


def test_failed_record_without_task_and_model_round_trips(store):
    record = make_record(status="failed", points=0)
    del record["task"], record["model"]
    record["scores"] = {"val": None, "test": None, "primary": None}
    store.save(record)
    assert store.get("abc123") == record


def test_rerun_replaces_row_and_curve_never_duplicates(store, tmp_path):
    store.save(make_record(status="failed", points=2))
    store.save(make_record(status="completed", points=4))
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM curve").fetchone()[0] == 4
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.get("abc123")["status"] == "completed"


def test_a_failing_write_leaves_the_previous_state(store):
    store.save(make_record(points=3))
    broken = make_record(status="failed", points=3)
    broken["curve"][2]["step"] = None  # NOT NULL: the third curve row fails mid-transaction
    with pytest.raises(sqlite3.IntegrityError):
        store.save(broken)
    kept = store.get("abc123")
    assert kept["status"] == "completed" and len(kept["curve"]) == 3


def test_only_final_statuses_are_stored(store):
    with pytest.raises(ValueError, match="finished runs"):
        store.save(make_record(status="running"))


def test_final_hashes_and_suite_membership(store):
    store.add_to_suite("grid", ["h2", "h1", "h3"])
    store.save(make_record("h1", "completed"), suite="grid")
    store.save(make_record("h2", "diverged", seed=1), suite="grid")
    store.save(make_record("h3", "failed", seed=2), suite="grid")
    store.save(make_record("other", "completed", seed=3), suite="elsewhere")
    assert store.final_hashes(["h1", "h2", "h3", "h4"]) == {"h1", "h2"}
    assert [r["run"]["hash"] for r in store.records("grid")] == ["h2", "h1", "h3"]
    assert len(store.records()) == 4
    assert store.suites() == ["elsewhere", "grid"]


def test_scalar_columns_are_filled(store, tmp_path):
    store.save(make_record(), suite="s")
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        row = conn.execute("SELECT suite, model, task, method, train_size, seed, status, "
                           "primary_metric, val_score, test_score FROM runs").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert row == ("s", "tiny-random-llama", "toy_cls", "lora", 64, 0, "completed",
                   "accuracy", 52.0, 51.0)
    assert mode == "wal"


def test_bad_database_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such results database"):
        ResultStore(tmp_path / "missing.sqlite", must_exist=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="not a peftbench results database"):
        ResultStore(junk)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UsageError, match="newer peftbench"):
        ResultStore(newer)


def test_export_csv_and_json(store):
    records = [make_record("h1"), make_record("h2", "failed", seed=1)]
    for record in records:
        store.save(copy.deepcopy(record))
    stored = store.records()
    text = io.StringIO()
    write_csv(stored, text)
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert rows[0]["test_score"] == "51.0" and rows[1]["error"] == "boom"
    assert flat_row(stored[0])["trainable_pct"] == 10.0
    # the precision computed in: recorded under precision auto, else the configured one
    auto = copy.deepcopy(stored[0])
    auto["run"]["config"]["precision"], auto["run"]["precision"] = "auto", "fp32"
    assert flat_row(auto)["precision"] == "fp32"
    older = copy.deepcopy(stored[0])
    older["run"]["config"]["precision"] = "bf16"
    older["run"].pop("precision", None)
    assert flat_row(older)["precision"] == "bf16"
    assert "precision" in rows[0]
    assert json.loads(rows[0]["method_args"]) == stored[0]["run"]["config"]["method_args"]
    text = io.StringIO()
    write_json(stored, text)
    assert json.loads(text.getvalue()) == records


def test_a_database_path_that_cannot_be_one_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is a folder; give the results database file"):
        ResultStore(tmp_path)
    with pytest.raises(UsageError, match="cannot open or create it"):
        ResultStore("/proc/peftbench-test/results.sqlite")


def test_json_export_writes_no_bare_nan(store):
    record = make_record("h1")
    record["curve"][-1]["train_loss"] = float("nan")
    store.save(record)
    text = io.StringIO()
    write_json(store.records(), text)
    assert "NaN" not in text.getvalue()
    assert json.loads(text.getvalue())[0]["curve"][-1]["train_loss"] is None


# -- locked and read-only databases --------------------------------------------------------
READING_COMMANDS = (["results"], ["analyze"], ["report", "--out", "report.html"],
                    ["recommend", "--task-type", "classification", "--train-size", "64"])


@pytest.fixture()
def saved(tmp_path, monkeypatch):
    """A results database with one run, in the current folder (the reports go there)."""
    monkeypatch.chdir(tmp_path)
    with ResultStore(tmp_path / "r.sqlite") as opened:
        opened.save(make_record(), suite="s")
    return tmp_path / "r.sqlite"


def hold_exclusive_lock(path) -> sqlite3.Connection:
    """Another program's connection that keeps everyone else out (readers too, WAL or not)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    code, out, err = run_main(capsys, monkeypatch, *args)
    return code, out, " ".join(err.split())  # rich wraps long errors


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda c: c[0])
def test_a_locked_database_is_announced_then_named_locked(capsys, monkeypatch, saved,
                                                          command):
    monkeypatch.setattr(db, "READ_WAIT_S", 0.5)
    holder = hold_exclusive_lock(saved)
    try:
        code, _, err = cli(capsys, monkeypatch, *command, "--db", str(saved))
    finally:
        holder.close()
    assert code == 2, err
    assert err.startswith(f"--db {saved}: locked by another program; waiting up to 0.5 s")
    assert (f"error: --db {saved}: the database is locked by another program (still locked "
            "after 0.5 s); retry when it has finished." in err)
    assert "not a peftbench results database" not in err and "Traceback" not in err


def test_a_reader_reads_once_the_lock_is_released(capsys, monkeypatch, saved):
    holder = hold_exclusive_lock(saved)
    connect = db._connect_sqlite

    def release_once_waiting(target: str, uri: bool, timeout: float) -> sqlite3.Connection:
        # the lock goes 0.3 s after the reader announced it and started its wait (READ_WAIT_S,
        # 5 s, is plenty): a timer started with the test raced a slow start-up of the command
        if timeout > db.FIRST_TRY_S:
            threading.Timer(0.3, holder.close).start()
        return connect(target, uri=uri, timeout=timeout)

    monkeypatch.setattr(db, "_connect_sqlite", release_once_waiting)
    code, out, err = cli(capsys, monkeypatch, "results", "--db", str(saved), "--format", "csv")
    assert code == 0, err
    assert "waiting up to 5 s" in err and "abc123" in out


def test_the_writer_waits_longer_and_also_names_the_lock(monkeypatch, saved, capsys):
    assert db.WRITE_WAIT_S >= 30  # a sweep outwaits other writers' short transactions
    monkeypatch.setattr(db, "WRITE_WAIT_S", 0.5)
    holder = hold_exclusive_lock(saved)
    try:
        with pytest.raises(UsageError, match="locked by another program"):
            ResultStore(saved)
    finally:
        holder.close()
    assert "waiting up to 0.5 s" in capsys.readouterr().err


def act_as_read_only_mount(monkeypatch) -> None:
    """Opens fail as on a read-only mount of a WAL database (its -shm cannot be made),
    except the immutable one; as root, too, where chmod would not stop writes."""
    real = db._connect_sqlite

    def connect(target: str, uri: bool, timeout: float) -> sqlite3.Connection:
        if "immutable=1" not in target:
            raise sqlite3.OperationalError("unable to open database file")
        return real(target, uri, timeout)

    monkeypatch.setattr(db, "_connect_sqlite", connect)


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda c: c[0])
def test_a_database_on_a_read_only_mount_is_read(capsys, monkeypatch, saved, command):
    before = saved.read_bytes()
    act_as_read_only_mount(monkeypatch)
    code, _, err = cli(capsys, monkeypatch, *command, "--db", str(saved))
    assert code == 0, err
    assert err == "" and saved.read_bytes() == before
    with ResultStore(saved, must_exist=True) as store:
        assert store.read_only and [r["run"]["hash"] for r in store.records()] == ["abc123"]


def test_read_only_mounts_still_tell_what_is_wrong(monkeypatch, tmp_path, saved):
    act_as_read_only_mount(monkeypatch)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="not a peftbench results database"):
        ResultStore(junk, must_exist=True)
    with pytest.raises(UsageError, match="cannot open or create it"):
        ResultStore(saved)  # `peftbench run` needs to write
    monkeypatch.setattr(db, "_connect_sqlite", lambda *args, **kwargs: sqlite3.connect(
        str(tmp_path / "missing" / "x.sqlite")))  # opens in no mode
    with pytest.raises(UsageError, match=r"cannot read it \(unable to open database file\); "
                                         "check that you may read the file and its folder"):
        ResultStore(saved, must_exist=True)


def test_unmerged_changes_a_read_only_open_cannot_see_are_mentioned(monkeypatch, saved,
                                                                    capsys):
    (saved.parent / "r.sqlite-wal").write_bytes(b"x" * 100)  # as a killed run leaves it
    act_as_read_only_mount(monkeypatch)
    ResultStore(saved, must_exist=True).close()
    err = " ".join(capsys.readouterr().err.split())
    assert "r.sqlite-wal holds changes not merged into it yet" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="as root chmod does not stop writes; "
                    "test_a_database_on_a_read_only_mount_is_read covers this")
def test_a_database_in_a_folder_without_write_permission_is_read(capsys, monkeypatch,
                                                                 tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with ResultStore(folder / "r.sqlite") as store:
        store.save(make_record())
    (folder / "r.sqlite").chmod(0o444)
    folder.chmod(0o555)
    try:
        code, out, err = cli(capsys, monkeypatch, "results", "--db", str(folder / "r.sqlite"),
                             "--format", "csv")
    finally:
        folder.chmod(0o755)
    assert code == 0 and "abc123" in out, err
