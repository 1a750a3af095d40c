"""The report: one self-contained HTML page (inline CSS and SVG, no scripts) and its
Markdown twin, from an :class:`~peftbench.analysis.Analysis`."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftbench.analysis.overview import Analysis


def report_meta(analysis: Analysis, source: str, command: str) -> dict[str, Any]:
    """Header facts and summary cards."""
    from peftbench import __version__
    from peftbench.analysis.records import set_aside_note
    from peftbench.report.tables import claim_summary

    cells = analysis.cells
    aside = [r for c in cells for r in c.set_aside]
    cards = [("completed runs", str(len(analysis.records) - len(analysis.failed))),
             ("failed / diverged", str(len(analysis.failed))),
             ("tasks", str(len({c.key.task for c in cells}))),
             ("methods", str(len({c.key.method for c in cells}))),
             ("train sizes", ", ".join(f"{s:,}" for s in sorted({c.key.train_size
                                                                for c in cells})) or "-"),
             # the values, labelled as such: a card "0 / seeds" read as "no seeds"
             ("seed values", ", ".join(str(s) for s in sorted({s for c in cells
                                                                for s in c.seeds})) or "-"),
             ("models", ", ".join(sorted({c.key.model for c in cells})) or "-")]
    return {"source": source, "command": command, "version": __version__,
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": len(analysis.records),
            "usable": len(analysis.records) - len(analysis.failed) - len(aside),
            "failed": len(analysis.failed), "set_aside": len(aside),
            "set_aside_note": set_aside_note(analysis.cells) or "", "cards": cards,
            "claim_lines": claim_summary(analysis), "subtitle": source}


def standalone_svg(svg: str) -> str:
    """An inline plot as an SVG file: XML prolog and its natural size from the viewBox."""
    box = re.search(r'viewBox="0 0 ([0-9.]+) ([0-9.]+)"', svg)
    size = f'width="{box[1]}pt" height="{box[2]}pt" ' if box else ""
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            + re.sub(r'class="plot" style="[^"]*" ', size, svg, count=1))


def write_report(analysis: Analysis, out: Path, source: str,
                 command: str = "peftbench report") -> tuple[Path, Path]:
    """Write ``out`` (HTML) and the Markdown twin beside it (``.md``, plots in
    ``<stem>_files/``). Returns both paths."""
    from peftbench.report.figures import figures
    from peftbench.report.html import render_html
    from peftbench.report.markdown import render_markdown
    from peftbench.report.tables import all_tables

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = all_tables(analysis)
    figs = figures(analysis)
    meta = report_meta(analysis, source, command)
    out.write_text(render_html(tables, figs, meta), encoding="utf-8")
    md_path = out.with_suffix(".md")
    files = out.parent / f"{out.stem}_files"
    paths: dict[str, str] = {}
    if figs:
        files.mkdir(exist_ok=True)
        for f in figs:
            (files / f"{f.key}.svg").write_text(standalone_svg(f.svg), encoding="utf-8")
            paths[f.key] = f"{files.name}/{f.key}.svg"
    md_path.write_text(render_markdown(tables, figs, meta, paths), encoding="utf-8")
    return out, md_path
