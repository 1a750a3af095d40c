"""Results as flat rows (table, CSV) or as full records (JSON)."""

from __future__ import annotations

import csv
import json
from typing import Any, TextIO

from peftbench.files import json_safe

FLAT_COLUMNS = ("run_hash", "model", "task", "method", "method_args", "train_size", "seed", "lr",
                "precision", "status",
                "primary_metric", "val_score", "test_score", "best_step", "total_steps",
                "trainable_params", "total_params", "trainable_pct", "train_seconds",
                "eval_seconds", "tokens_per_second", "peak_rss_mb", "peak_gpu_mb",
                "adapter_bytes", "started_at", "finished_at", "error")


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """One line per run: identity, status, primary scores and costs."""
    run, scores = record["run"], record.get("scores") or {}
    config = run["config"]
    metric = scores.get("primary")
    params, eff = record.get("params") or {}, record.get("efficiency") or {}

    def primary(split: str) -> Any:
        values = scores.get(split) or {}
        return values.get(metric) if metric else None

    row = {"run_hash": run["hash"], "model": config["model"], "task": config["task"],
           "method": config["method"],
           # as configured (JSON): what tells variants of one method apart
           "method_args": json.dumps(config.get("method_args") or {}, sort_keys=True),
           "train_size": config.get("train_size"),
           "seed": config.get("seed"), "lr": run.get("lr", config.get("lr")),
           "precision": _precision(run),
           "status": record["status"], "primary_metric": metric,
           "val_score": primary("val"), "test_score": primary("test"),
           "best_step": scores.get("best_step"), "total_steps": run.get("total_steps"),
           "trainable_params": params.get("trainable"), "total_params": params.get("total"),
           "trainable_pct": params.get("trainable_pct"),
           "started_at": run.get("started_at"), "finished_at": run.get("finished_at"),
           "error": record.get("error")}
    for key in ("train_seconds", "eval_seconds", "tokens_per_second", "peak_rss_mb",
                "peak_gpu_mb", "adapter_bytes"):
        row[key] = eff.get(key)
    return {column: row[column] for column in FLAT_COLUMNS}


def _precision(run: dict[str, Any]) -> str | None:
    """The precision a run computed in: recorded since ``precision: auto``; older records
    only have the configured one, which was bf16 or fp32 then."""
    used = run.get("precision") or run["config"].get("precision")
    return None if used == "auto" else used


def write_csv(records: list[dict[str, Any]], stream: TextIO) -> None:
    writer = csv.DictWriter(stream, fieldnames=FLAT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(flat_row(record))


def write_json(records: list[dict[str, Any]], stream: TextIO) -> None:
    json.dump(json_safe(records), stream, indent=2, default=str, allow_nan=False)
    stream.write("\n")
