"""The Markdown twin of the report: the same tables; plots as SVG files beside it."""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from peftbench.report.figures import Figure
from peftbench.report.tables import Strong, Table


def cell(value: str) -> str:
    """A table cell: HTML-escaped (Markdown passes HTML through), pipes and newlines
    neutralised; Strong cells bold."""
    text = html.escape(str(value), quote=False).replace("|", "\\|")
    text = " ".join(text.split()) or " "
    for char in "*_`[]":
        text = text.replace(char, "\\" + char)
    return f"**{text}**" if isinstance(value, Strong) else text


def text(value: str) -> str:
    """Running text: HTML-escaped, Markdown emphasis characters escaped."""
    escaped = html.escape(str(value), quote=False)
    for char in "*_`[]":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def table(t: Table, title: bool = True) -> str:
    lines = [f"### {text(t.title)}", ""] if title else []
    if t.rows:
        lines.append("| " + " | ".join(cell(h) for h in t.header) + " |")
        lines.append("|" + "|".join("---" for _ in t.header) + "|")
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    else:
        lines.append("_No rows._")
    lines += [""] + [f"- {text(n)}" for n in t.notes]
    return "\n".join(lines) + "\n"


def render_markdown(tables: dict[str, Table], figures: list[Figure], meta: dict[str, Any],
                    figure_paths: dict[str, str]) -> str:
    """The report as Markdown; ``figure_paths`` maps figure keys to relative SVG paths."""
    def figs(*sections: str) -> list[str]:
        out = []
        for f in figures:
            if f.section in sections and f.key in figure_paths:
                link = quote(str(figure_paths[f.key]))  # spaces, brackets: a valid link
                out += [f"### {text(f.title)}", "", f"![{text(f.title)}]({link})", "",
                        f"_{text(f.caption)}_", ""]
        return out or ["_No completed runs to plot._", ""]

    parts = [
        "# peftbench report", "",
        text(meta["source"]), "",
        text(f"Generated {meta['generated']} by peftbench {meta['version']}; {meta['runs']} "
             f"runs ({meta['usable']} used, {meta['failed']} failed or diverged"
             + (f", {meta['set_aside']} set aside" if meta["set_aside"] else "") + ")."), "",
        *([text(meta["set_aside_note"]), ""] if meta["set_aside_note"] else []),
        "## Summary", "",
        *[f"- {text(label)}: {text(value)}" for label, value in meta["cards"]],
        *[f"- {text(line)}" for line in meta["claim_lines"]], "",
        table(tables["decision"]),
        "## Benchmark", "", table(tables["benchmark"], title=False),
        "## Score and cost", "", *figs("sizes", "pareto"),
        "## Learning curves", "", *figs("curves"),
        "## Convergence", "", table(tables["convergence"], title=False), table(tables["claim"]),
        "## Data requirement", "", table(tables["requirement_type"]),
        table(tables["requirement"]),
        "## Selective training", "", table(tables["selective"], title=False),
        *(figs("selective") if tables["selective"].rows else []),
        "## Failed and diverged runs", "", table(tables["failed"], title=False),
        "## Provenance", "",
        *[table(tables[k]) for k in ("prov_models", "prov_tasks", "prov_hardware",
                                     "prov_versions")],
        f"Regenerate with: {text(meta['command'])}", "",
    ]
    return "\n".join(parts)
