"""The results database layout: one row per run, its curve points, suite membership.

A run's identity is ``RunSpec.run_hash()``. ``runs`` keeps the few scalars worth indexing
and filtering on as columns and the rest of the result record as JSON text; ``curve`` keeps
one row per validation point. ``suite_runs`` says which suites a run belongs to (the same
run, same hash, can be part of several suites and is computed once).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# Final statuses a record can be stored with ("running" records are never stored).
STATUSES = ("completed", "diverged", "failed")

DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_hash         TEXT PRIMARY KEY,
    suite            TEXT,              -- the suite whose sweep computed this row
    model            TEXT NOT NULL,
    task             TEXT NOT NULL,
    method           TEXT NOT NULL,
    train_size       INTEGER,
    seed             INTEGER NOT NULL,
    lr               REAL,              -- the learning rate used (spec's, else method default)
    status           TEXT NOT NULL CHECK (status IN ('completed', 'diverged', 'failed')),
    error            TEXT,
    primary_metric   TEXT,
    val_score        REAL,              -- primary metric at the best validation step
    test_score       REAL,              -- primary metric on test, best checkpoint
    trainable_params INTEGER,
    total_params     INTEGER,
    started_at       TEXT,
    finished_at      TEXT,
    stored_at        TEXT NOT NULL,
    -- the rest of the record, as JSON; NULL where the record has no such key
    run_json         TEXT NOT NULL,     -- record["run"]: hash, resolved config, times, lr ...
    params_json      TEXT,
    scores_json      TEXT,
    efficiency_json  TEXT,
    provenance_json  TEXT,
    task_json        TEXT,              -- record["task"] (absent when the run failed early)
    model_json       TEXT,              -- record["model"]
    extra_json       TEXT               -- any other top-level keys (e.g. traceback)
);
CREATE INDEX IF NOT EXISTS runs_suite ON runs (suite);
CREATE INDEX IF NOT EXISTS runs_grid ON runs (model, task, method, train_size, seed);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);

CREATE TABLE IF NOT EXISTS curve (
    run_hash    TEXT NOT NULL REFERENCES runs (run_hash) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,       -- position in the record's curve list
    step        INTEGER NOT NULL,
    samples     INTEGER,
    seconds     REAL,
    train_loss  REAL,
    val_score   REAL,
    extra_json  TEXT,                   -- keys beyond the five above, if any
    PRIMARY KEY (run_hash, idx)
);

CREATE TABLE IF NOT EXISTS suite_runs (
    suite     TEXT NOT NULL,
    run_hash  TEXT NOT NULL,
    position  INTEGER NOT NULL,         -- order in the suite's expanded grid
    PRIMARY KEY (suite, run_hash)
);
"""

CURVE_KEYS = ("step", "samples", "seconds", "train_loss", "val_score")

# Top-level record keys with a column of their own (everything else goes to extra_json).
RECORD_JSON_COLUMNS = {"run": "run_json", "params": "params_json", "scores": "scores_json",
                       "efficiency": "efficiency_json", "provenance": "provenance_json",
                       "task": "task_json", "model": "model_json"}
RECORD_SCALAR_KEYS = ("status", "error")
