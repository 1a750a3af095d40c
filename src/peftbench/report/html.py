"""The self-contained HTML report: inline CSS and SVG, no scripts, every string escaped."""

from __future__ import annotations

from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from peftbench.report.figures import Figure
from peftbench.report.tables import Strong, Table


def _environment() -> jinja2.Environment:
    template = resources.files("peftbench.report").joinpath("template.html.j2").read_text()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.tests["strong"] = lambda value: isinstance(value, Strong)
    env.filters["display_rows"] = display_rows
    env.globals["_template"] = template
    return env


def display_rows(table: Table) -> list[dict[str, Any]]:
    """Rows for the template: grouping columns blanked when repeated, group starts marked."""
    rows, previous = [], None
    for row in table.rows:
        key = row[:table.group]
        repeat = table.group > 0 and key == previous
        cells = [("" if repeat and i < table.group else value) for i, value in enumerate(row)]
        rows.append({"cells": cells, "start": table.group > 0 and not repeat})
        previous = key
    return rows


def render_html(tables: dict[str, Table], figures: list[Figure], meta: dict[str, Any]) -> str:
    """The page. ``figures``' SVG is matplotlib's output (its text escaped by matplotlib)
    and is inserted as markup; everything else is escaped by autoescape."""
    env = _environment()
    page = env.from_string(env.globals["_template"])
    inline = [Figure(f.key, f.section, f.title, f.caption, Markup(f.svg)) for f in figures]
    return page.render(tables=tables, figures=inline, meta=meta)
