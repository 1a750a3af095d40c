"""The SQLite results store: the only code that reads or writes the results database.

Every run is written in one transaction (its row and all its curve points together), with
``INSERT OR REPLACE`` on the run hash: a re-run replaces the earlier row, and a process
killed mid-write leaves the previous state (WAL journal, synchronous=FULL), never half a
result and never two.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftbench.errors import UsageError
from peftbench.store.schema import (
    CURVE_KEYS,
    DDL,
    RECORD_JSON_COLUMNS,
    RECORD_SCALAR_KEYS,
    SCHEMA_VERSION,
    STATUSES,
)

DEFAULT_DB = "peftbench-results.sqlite"
# Completed and diverged runs are results; failed ones are retried by the next sweep.
FINAL_STATUSES = ("completed", "diverged")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=False, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _primary_score(scores: dict[str, Any] | None, metric: str | None) -> float | None:
    if not scores or not metric:
        return None
    value = scores.get(metric)
    return float(value) if isinstance(value, int | float) else None


class ResultStore:
    """A results database file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path, must_exist: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"--db {self.path}: is a folder; give the results database "
                             f"file, e.g. --db {self.path / DEFAULT_DB}")
        if must_exist and not self.path.is_file():
            raise UsageError(f"--db {self.path}: no such results database (it is created by "
                             "`peftbench run`).")
        try:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as exc:
            raise UsageError(f"--db {self.path}: cannot open or create it ({exc}); give a "
                             "path in a folder you can write") from None
        try:
            self._conn.row_factory = sqlite3.Row
            self._check_ours(reading=must_exist)  # before any pragma changes the file
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                           "busy_timeout=60000"):
                self._conn.execute(f"PRAGMA {pragma}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"--db {self.path}: not a peftbench results database ({exc}).") \
                from None

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _check_ours(self, reading: bool) -> None:
        """Refuse another program's SQLite database (its tables are not ours to add to)
        and, when ``reading``, a file with no results at all (empty, or no tables)."""
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        if version != 0 and "runs" in tables:
            return
        if tables:
            what = f"an SQLite database of something else, with tables {', '.join(tables[:5])}"
        elif reading:
            what = "an empty file" if self.path.stat().st_size == 0 else "no tables in it"
        else:
            return
        self.close()
        raise UsageError(f"--db {self.path}: not a peftbench results database ({what}); "
                         "give the file that `peftbench run --db` wrote, or a new path.")

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(f"--db {self.path}: written by a newer peftbench (schema "
                             f"{version}, this one knows {SCHEMA_VERSION}); upgrade peftbench.")
        if version == SCHEMA_VERSION:
            return
        try:
            self._conn.executescript(f"BEGIN IMMEDIATE; {DDL}; "
                                     f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------------
    def save(self, record: dict[str, Any], suite: str | None = None) -> None:
        """Store one finished run (row + curve) in a single transaction, replacing any
        earlier row with the same run hash."""
        if record.get("status") not in STATUSES:
            raise ValueError(f"only finished runs are stored, got status {record.get('status')!r}")
        run = record["run"]
        config = run["config"]
        metric = (record.get("scores") or {}).get("primary")
        scores = record.get("scores") or {}
        params = record.get("params") or {}
        row = {
            "run_hash": run["hash"], "suite": suite, "model": config["model"],
            "task": config["task"], "method": config["method"],
            "train_size": config.get("train_size"), "seed": config.get("seed", 0),
            "lr": run.get("lr", config.get("lr")), "status": record["status"],
            "error": record.get("error"), "primary_metric": metric,
            "val_score": _primary_score(scores.get("val"), metric),
            "test_score": _primary_score(scores.get("test"), metric),
            "trainable_params": params.get("trainable"), "total_params": params.get("total"),
            "started_at": run.get("started_at"), "finished_at": run.get("finished_at"),
            "stored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for key, column in RECORD_JSON_COLUMNS.items():  # NULL: the record has no such key
            row[column] = _dumps(record[key]) if key in record else None
        known = {*RECORD_JSON_COLUMNS, *RECORD_SCALAR_KEYS, "curve"}
        extra = {k: v for k, v in record.items() if k not in known}
        row["extra_json"] = _dumps(extra) if extra else None
        curve_rows = [
            (run["hash"], idx, point["step"], point.get("samples"), point.get("seconds"),
             point.get("train_loss"), point.get("val_score"),
             _dumps({k: v for k, v in point.items() if k not in CURVE_KEYS})
             if set(point) - set(CURVE_KEYS) else None)
            for idx, point in enumerate(record.get("curve") or [])
        ]
        columns = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        with self._transaction() as conn:
            conn.execute("DELETE FROM curve WHERE run_hash = ?", (run["hash"],))
            conn.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", row)
            conn.executemany("INSERT INTO curve VALUES (?, ?, ?, ?, ?, ?, ?, ?)", curve_rows)
            if suite is not None:
                conn.execute("INSERT OR IGNORE INTO suite_runs VALUES (?, ?, "
                             "(SELECT COUNT(*) FROM suite_runs WHERE suite = ?))",
                             (suite, run["hash"], suite))

    def add_to_suite(self, suite: str, run_hashes: Iterable[str]) -> None:
        """Record that these runs (in this grid order) belong to ``suite``."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO suite_runs VALUES (?, ?, ?)",
                             [(suite, h, i) for i, h in enumerate(run_hashes)])

    # -- reading -----------------------------------------------------------------------
    def statuses(self, run_hashes: Iterable[str] | None = None) -> dict[str, str]:
        """``{run_hash: status}`` of the stored runs (all, or those among ``run_hashes``)."""
        rows = self._conn.execute("SELECT run_hash, status FROM runs").fetchall()
        wanted = None if run_hashes is None else set(run_hashes)
        return {r["run_hash"]: r["status"] for r in rows if wanted is None or
                r["run_hash"] in wanted}

    def final_hashes(self, run_hashes: Iterable[str]) -> set[str]:
        """The runs among ``run_hashes`` whose stored result is final (not to be redone)."""
        return {h for h, s in self.statuses(run_hashes).items() if s in FINAL_STATUSES}

    def _select(self, suite: str | None) -> list[sqlite3.Row]:
        if suite is None:
            return self._conn.execute(
                "SELECT * FROM runs ORDER BY model, task, train_size, method, lr, seed"
            ).fetchall()
        return self._conn.execute(
            "SELECT r.* FROM runs r LEFT JOIN suite_runs s "
            "ON s.run_hash = r.run_hash AND s.suite = :suite "
            "WHERE s.suite IS NOT NULL OR r.suite = :suite "
            "ORDER BY s.position IS NULL, s.position, r.model, r.task, r.train_size, r.method",
            {"suite": suite}).fetchall()

    def _curve(self, run_hash: str) -> list[dict[str, Any]]:
        points = []
        for row in self._conn.execute("SELECT * FROM curve WHERE run_hash = ? ORDER BY idx",
                                      (run_hash,)):
            point = {key: row[key] for key in CURVE_KEYS}
            point.update(_loads(row["extra_json"]) or {})
            points.append(point)
        return points

    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        record: dict[str, Any] = {"run": _loads(row["run_json"]), "status": row["status"],
                                  "error": row["error"]}
        for key, column in RECORD_JSON_COLUMNS.items():
            if key != "run" and row[column] is not None:
                record[key] = _loads(row[column])
        record["curve"] = self._curve(row["run_hash"])
        record.update(_loads(row["extra_json"]) or {})
        return record

    def records(self, suite: str | None = None) -> list[dict[str, Any]]:
        """The stored runs as result records (the keys of ``result.json``)."""
        return [self._record(row) for row in self._select(suite)]

    def get(self, run_hash: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM runs WHERE run_hash = ?",
                                 (run_hash,)).fetchone()
        return None if row is None else self._record(row)

    def suites(self) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT suite FROM suite_runs UNION "
                                  "SELECT DISTINCT suite FROM runs WHERE suite IS NOT NULL")
        return sorted(r[0] for r in rows)
