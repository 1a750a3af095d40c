"""The short summary ``peftbench train`` prints at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_summary(console: Console, record: dict[str, Any], out_dir: Path) -> None:
    config = record["run"]["config"]
    status = record["status"]
    colour = {"completed": "green", "diverged": "yellow"}.get(status, "red")
    console.print(f"[bold]{config['task']} / {config['model']} / {config['method']}[/]  "
                  f"status [{colour}]{status}[/]")
    for warning in record["run"].get("warnings") or []:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if record.get("error"):
        console.print(f"[red]error:[/] {escape(record['error'])}", highlight=False)
    params = record.get("params") or {}
    if params:
        console.print(f"trainable parameters {params['trainable']:,} of {params['total']:,} "
                      f"({params['trainable_pct']:.3f} %)")
    curve = record.get("curve") or []
    primary = record["scores"].get("primary")
    if curve and primary:
        first, best = curve[0], max(curve, key=lambda p: p["val_score"])
        console.print(f"validation {primary}: step 0 {first['val_score']:.2f} -> best "
                      f"{best['val_score']:.2f} at step {best['step']}")
    test = record["scores"].get("test")
    if test:
        table = Table("test metric", "value")
        for key, value in test.items():
            if key not in ("primary", "bleu_signature"):
                table.add_row(key + (" (primary)" if key == primary else ""), _fmt(value))
        console.print(table)
    eff = record.get("efficiency") or {}
    if eff:
        tps = eff.get("tokens_per_second")
        console.print(f"train {eff['train_seconds']:.1f} s, eval {eff['eval_seconds']:.1f} s, "
                      f"{tps or 0:.0f} tokens/s, peak RSS {eff['peak_rss_mb']:.0f} MB, "
                      f"adapter {eff['adapter_bytes']:,} bytes")
    console.print(f"result: {out_dir / 'result.json'}")
