"""The SQLite results store: the only code that reads or writes the results database.

Every run is written in one transaction (its row and all its curve points together), with
``INSERT OR REPLACE`` on the run hash: a re-run replaces the earlier row, and a process
killed mid-write leaves the previous state (WAL journal, synchronous=FULL), never half a
result and never two.
"""

from __future__ import annotations

import json
import sqlite3
import sys
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
# How long to wait for another program's lock on the file: a reading command gives up soon
# and says so; the sweep's writer outwaits the short transactions of other writers.
READ_WAIT_S = 5.0
WRITE_WAIT_S = 60.0
FIRST_TRY_S = 0.2  # a lock still held after this is announced on stderr before waiting on

_LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")
_UNWRITABLE = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")
_NOT_OURS = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


def _kind(exc: sqlite3.Error) -> str:
    """What an SQLite error means here: ``locked`` (another program holds a lock),
    ``unwritable`` (the file or its folder cannot be written or opened), ``not_ours`` (not
    an SQLite database, or a damaged one) or ``other``."""
    name = getattr(exc, "sqlite_errorname", "")  # Python >= 3.11; else the message says
    text = str(exc).lower()
    if name.startswith(_LOCKED) or "database is locked" in text or "is busy" in text:
        return "locked"
    if name.startswith(_UNWRITABLE) or "unable to open" in text or "readonly" in text:
        return "unwritable"
    if name.startswith(_NOT_OURS) or "not a database" in text or "malformed" in text:
        return "not_ours"
    return "other"


def _connect_sqlite(target: str, uri: bool, timeout: float) -> sqlite3.Connection:
    """``sqlite3.connect`` in autocommit mode (tests replace it to act as a read-only
    mount)."""
    return sqlite3.connect(target, uri=uri, timeout=timeout, isolation_level=None)


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
    """A results database file. Use as a context manager, or call :meth:`close`.

    ``must_exist``: a reading command's open (results, report, ...): the file must hold
    results; another program's lock is waited for only :data:`READ_WAIT_S`, and where the
    file or its folder cannot be written (a read-only mount) it is opened read-only
    (:attr:`read_only`). The writer (``peftbench run``) waits up to :data:`WRITE_WAIT_S`.
    """

    def __init__(self, path: str | Path, must_exist: bool = False) -> None:
        self.path = Path(path)
        self.reading = must_exist
        self.read_only = False
        self.wait_s = READ_WAIT_S if must_exist else WRITE_WAIT_S
        if self.path.is_dir():
            raise UsageError(f"--db {self.path}: is a folder; give the results database "
                             f"file, e.g. --db {self.path / DEFAULT_DB}")
        if must_exist and not self.path.is_file():
            raise UsageError(f"--db {self.path}: no such results database (it is created by "
                             "`peftbench run`).")
        if not must_exist and self.path.parent != Path():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"--db {self.path}: cannot open or create it ({exc}); give "
                                 "a path in a folder you can write") from None
        self._conn = self._open()

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

    # -- opening -----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        """Connect and check the file. A reading command whose file or folder cannot be
        written (read-only mount) falls back to ``mode=ro``, then ``immutable=1``."""
        try:
            return self._connect_waiting(str(self.path), uri=False)
        except sqlite3.Error as exc:
            if not (self.reading and _kind(exc) == "unwritable"):
                raise self._usage_error(exc) from None
            first = exc
        for query in ("mode=ro", "immutable=1"):
            try:
                conn = self._connect_waiting(f"{self.path.resolve().as_uri()}?{query}",
                                             uri=True)
            except sqlite3.Error as exc:
                if _kind(exc) != "unwritable":
                    raise self._usage_error(exc) from None
                continue
            self.read_only = True
            if query == "immutable=1":
                self._warn_unread_log()
            return conn
        raise self._usage_error(first) from None

    def _connect_waiting(self, target: str, uri: bool) -> sqlite3.Connection:
        """:meth:`_connect`; when another program holds a lock on the file, say so on
        stderr at once and wait up to :attr:`wait_s` for it."""
        try:
            return self._connect(target, uri, FIRST_TRY_S)
        except sqlite3.OperationalError as exc:
            if _kind(exc) != "locked":
                raise
        print(f"--db {self.path}: locked by another program; waiting up to {self.wait_s:g} s "
              "for it to finish ...", file=sys.stderr, flush=True)
        return self._connect(target, uri, self.wait_s)

    def _connect(self, target: str, uri: bool, wait_s: float) -> sqlite3.Connection:
        """A checked connection (ours, current schema), waiting ``wait_s`` for locks."""
        conn = _connect_sqlite(target, uri=uri, timeout=wait_s)
        try:
            conn.row_factory = sqlite3.Row
            self._check_ours(conn)  # before any pragma changes the file
            if not uri:  # the read-only fallbacks change nothing
                for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
                    conn.execute(f"PRAGMA {pragma}")
            conn.execute(f"PRAGMA busy_timeout = {int(self.wait_s * 1000)}")
            self._migrate(conn, writable=not uri)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_ours(self, conn: sqlite3.Connection) -> None:
        """Refuse another program's SQLite database (its tables are not ours to add to)
        and, when reading, a file with no results at all (empty, or no tables)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        if version != 0 and "runs" in tables:
            return
        if tables:
            what = f"an SQLite database of something else, with tables {', '.join(tables[:5])}"
        elif self.reading:
            what = "an empty file" if self.path.stat().st_size == 0 else "no tables in it"
        else:
            return
        raise UsageError(f"--db {self.path}: not a peftbench results database ({what}); "
                         "give the file that `peftbench run --db` wrote, or a new path.")

    def _migrate(self, conn: sqlite3.Connection, writable: bool) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(f"--db {self.path}: written by a newer peftbench (schema "
                             f"{version}, this one knows {SCHEMA_VERSION}); upgrade peftbench.")
        if version == SCHEMA_VERSION or not writable:  # (schema 1 is the only one yet)
            return
        try:
            conn.executescript(f"BEGIN IMMEDIATE; {DDL}; "
                               f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _usage_error(self, exc: sqlite3.Error) -> UsageError:
        """The one line for a database that could not be opened, by what went wrong."""
        kind = _kind(exc)
        if kind == "locked":
            return self._locked_error()
        if kind == "not_ours":
            return UsageError(f"--db {self.path}: not a peftbench results database ({exc}); "
                              "give the file that `peftbench run --db` wrote, or a new path.")
        if self.reading:
            return UsageError(f"--db {self.path}: cannot read it ({exc}); check that you may "
                              "read the file and its folder.")
        return UsageError(f"--db {self.path}: cannot open or create it ({exc}); give a path "
                          "in a folder you can write")

    def _locked_error(self) -> UsageError:
        return UsageError(f"--db {self.path}: the database is locked by another program "
                          f"(still locked after {self.wait_s:g} s); retry when it has finished.")

    def _warn_unread_log(self) -> None:
        """Opened immutable: runs still in the write-ahead log (not yet merged into the file,
        e.g. after a killed `peftbench run`) cannot be read without writing."""
        log = Path(f"{self.path}-wal")
        if log.is_file() and log.stat().st_size > 0:
            print(f"note: --db {self.path} is read-only here and {log.name} holds changes "
                  "not merged into it yet: the latest runs may be missing (open it once "
                  "where it can be written to merge them).", file=sys.stderr, flush=True)

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
        """Record that these runs (in this grid order) belong to ``suite``. Runs an earlier
        grid of the suite planned and never stored are no longer planned (the suite file
        changed); stored runs of earlier grids stay in the suite."""
        hashes = list(run_hashes)
        with self._transaction() as conn:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS grid (run_hash TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM grid")
            conn.executemany("INSERT OR IGNORE INTO grid VALUES (?)", [(h,) for h in hashes])
            conn.execute("DELETE FROM suite_runs WHERE suite = ? AND run_hash NOT IN "
                         "(SELECT run_hash FROM grid) AND run_hash NOT IN "
                         "(SELECT run_hash FROM runs)", (suite,))
            conn.executemany("INSERT OR REPLACE INTO suite_runs VALUES (?, ?, ?)",
                             [(suite, h, i) for i, h in enumerate(hashes)])

    # -- reading -----------------------------------------------------------------------
    def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """The rows of a query; a lock held past the wait is the one-line locked error."""
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if _kind(exc) == "locked":
                raise self._locked_error() from None
            raise

    def statuses(self, run_hashes: Iterable[str] | None = None) -> dict[str, str]:
        """``{run_hash: status}`` of the stored runs (all, or those among ``run_hashes``)."""
        rows = self._rows("SELECT run_hash, status FROM runs")
        wanted = None if run_hashes is None else set(run_hashes)
        return {r["run_hash"]: r["status"] for r in rows if wanted is None or
                r["run_hash"] in wanted}

    def final_hashes(self, run_hashes: Iterable[str]) -> set[str]:
        """The runs among ``run_hashes`` whose stored result is final (not to be redone)."""
        return {h for h, s in self.statuses(run_hashes).items() if s in FINAL_STATUSES}

    def _select(self, suite: str | None) -> list[sqlite3.Row]:
        if suite is None:
            return self._rows(
                "SELECT * FROM runs ORDER BY model, task, train_size, method, lr, seed")
        return self._rows(
            "SELECT r.* FROM runs r LEFT JOIN suite_runs s "
            "ON s.run_hash = r.run_hash AND s.suite = :suite "
            "WHERE s.suite IS NOT NULL OR r.suite = :suite "
            "ORDER BY s.position IS NULL, s.position, r.model, r.task, r.train_size, r.method",
            {"suite": suite})

    def _curve(self, run_hash: str) -> list[dict[str, Any]]:
        points = []
        for row in self._rows("SELECT * FROM curve WHERE run_hash = ? ORDER BY idx",
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
        rows = self._rows("SELECT * FROM runs WHERE run_hash = ?", (run_hash,))
        return self._record(rows[0]) if rows else None

    def planned(self, suite: str) -> set[str]:
        """The run hashes ``suite`` planned (every `peftbench run` of it adds its grid)."""
        return {r[0] for r in self._rows("SELECT run_hash FROM suite_runs WHERE suite = ?",
                                         (suite,))}

    def suites(self) -> list[str]:
        rows = self._rows("SELECT DISTINCT suite FROM suite_runs UNION "
                          "SELECT DISTINCT suite FROM runs WHERE suite IS NOT NULL")
        return sorted(r[0] for r in rows)
