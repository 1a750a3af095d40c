"""The SQLite results store: round trip, replace semantics, atomic writes, export."""

from __future__ import annotations

import copy
import csv
import io
import json
import sqlite3

import pytest

from peftbench.errors import UsageError
from peftbench.store import ResultStore, flat_row, write_csv, write_json
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
