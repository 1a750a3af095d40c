"""Execute a run and always leave an honest, complete ``result.json`` behind."""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftbench.config import RunSpec
from peftbench.errors import PeftbenchError
from peftbench.files import write_json_atomic
from peftbench.training.loop import Diverged, EventSink, train
from peftbench.training.provenance import git_sha, package_versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_record(spec: RunSpec) -> dict[str, Any]:
    """The result skeleton: every key present from the start."""
    return {
        "run": {"hash": spec.run_hash(), "config": spec.model_dump(), "started_at": _now(),
                "finished_at": None},
        "status": "running",
        "error": None,
        "params": {},
        "curve": [],
        "scores": {"val": None, "test": None, "primary": None},
        "efficiency": {},
        "provenance": {"versions": package_versions(), "git_sha": git_sha()},
    }


def execute(spec: RunSpec, out_dir: Path, on_event: EventSink | None = None,
            raise_usage_errors: bool = True) -> dict[str, Any]:
    """Run ``spec`` into ``out_dir``; the record's status says how it ended.

    Usage errors (unknown names, malformed data) propagate when ``raise_usage_errors`` so
    the CLI can exit 2; any other failure is recorded as ``failed`` with its error.
    """
    record = new_record(spec)
    start = time.perf_counter()
    try:
        train(spec, record, out_dir, on_event)
        record["status"] = "completed"
    except Diverged as exc:
        record["status"], record["error"] = "diverged", str(exc)
    except PeftbenchError as exc:
        if raise_usage_errors:
            raise
        record["status"], record["error"] = "failed", str(exc)
    except Exception as exc:  # recorded, never lost: the sweep goes on
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=20)
    record["scores"]["primary"] = record.get("task", {}).get("primary_metric")
    record["run"]["finished_at"] = _now()
    record["run"]["wall_seconds"] = round(time.perf_counter() - start, 3)
    write_json_atomic(out_dir / "result.json", record)
    return record
