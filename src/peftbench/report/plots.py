"""Plots as inline SVG text (matplotlib, Agg): learning curves, score vs size, Pareto.

Text stays text in the SVG (``svg.fonttype: none``) and is escaped by matplotlib; maths
parsing is off, so ``$`` in a task name is just a character.
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from peftbench.analysis.overview import Analysis
from peftbench.analysis.records import FULL, Cell, method_order

METHOD_COLOURS = {"full": "#111111", "lora": "#1f77b4", "ia3": "#ff7f0e",
                  "prompt_tuning": "#2ca02c", "bitfit": "#d62728"}
EXTRA_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SIZE_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "peftbench", "text.parse_math": False,
         "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "font.family": "sans-serif",
         "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "sans-serif"]}


def colour(method: str, methods: list[str]) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    extra = [m for m in methods if m not in METHOD_COLOURS]
    return EXTRA_COLOURS[extra.index(method) % len(EXTRA_COLOURS)] if method in extra else "#777"


@contextmanager
def _figure(panels: int, cols: int = 3, width: float = 4.0,
            height: float = 3.0) -> Iterator[tuple[Figure, list[Any]]]:
    cols = max(1, min(cols, panels))
    rows = math.ceil(panels / cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                                 squeeze=False, layout="constrained")
        flat = list(axes.flat)
        for ax in flat[panels:]:
            ax.set_visible(False)
        try:
            yield fig, flat[:panels]
        finally:
            plt.close(fig)


def to_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog, no comments), scaled by CSS."""
    buffer = io.StringIO()
    with plt.rc_context(STYLE):
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    # natural size as a maximum: the plot shrinks with the page but never blows up
    return re.sub(r'<svg([^>]*?) width="([0-9.]+)pt" height="[^"]*"',
                  r'<svg\1 class="plot" style="max-width: \2pt"', text, count=1)


def _legend(fig: Figure, methods: list[str], extra: list[tuple[str, Any]] = ()) -> None:
    handles = [plt.Line2D([], [], color=colour(m, methods), lw=3 if m == FULL else 1.8,
                          label="full fine-tuning" if m == FULL else m) for m in methods]
    handles += [h for _, h in extra]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8),
               frameon=False)


def _human(value: float, _pos: object = None) -> str:
    """Tick labels without maths text: 100, 1,000, 20K, 134M."""
    if value >= 1e9:
        return f"{value / 1e9:g}B"
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e4:
        return f"{value / 1e3:g}K"
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _log_x(ax: Any, ticks: list[float] | None = None) -> None:
    ax.set_xscale("log")
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_human))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _mean_curve(cell: Cell) -> tuple[list[float], list[float], list[float]]:
    """Samples, mean validation score and its seed std at each samples value."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for record in cell.runs:
        for point in record.get("curve") or []:
            if isinstance(point.get("val_score"), int | float):
                by_x[float(point.get("samples") or 0)].append(float(point["val_score"]))
    xs = sorted(by_x)
    means = [sum(by_x[x]) / len(by_x[x]) for x in xs]
    stds = [(sum((v - m) ** 2 for v in by_x[x]) / (len(by_x[x]) - 1)) ** 0.5
            if len(by_x[x]) > 1 else 0.0 for x, m in zip(xs, means, strict=True)]
    return xs, means, stds


def _cases(analysis: Analysis) -> dict[tuple[str, str], list[Cell]]:
    cases: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in analysis.cells:
        cases[(cell.key.model, cell.key.task)].append(cell)
    return cases


def _methods(cells: list[Cell]) -> list[str]:
    return sorted({c.key.method for c in cells}, key=method_order)


def _metric_label(cells: list[Cell]) -> str:
    metric = next((c.metric for c in cells if c.metric), None)
    return f"validation {metric}" if metric else "validation score"


def learning_curves(analysis: Analysis, model: str, task: str) -> str:
    """One panel per train size: validation score against samples seen, methods overlaid
    (mean over seeds, band = seed std), full fine-tuning thick and black."""
    cells = _cases(analysis)[(model, task)]
    sizes = sorted({c.key.train_size for c in cells})
    methods = _methods(cells)
    with _figure(len(sizes)) as (fig, axes):
        for ax, size in zip(axes, sizes, strict=True):
            for cell in sorted((c for c in cells if c.key.train_size == size),
                               key=lambda c: c.key.method == FULL):
                xs, ys, sd = _mean_curve(cell)
                is_full = cell.key.method == FULL
                c = colour(cell.key.method, methods)
                ax.plot(xs, ys, color=c, lw=3 if is_full else 1.6, marker="o",
                        ms=3, zorder=3 if is_full else 2)
                if any(sd):
                    ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)],
                                    [y + s for y, s in zip(ys, sd, strict=True)],
                                    color=c, alpha=0.12, lw=0)
            ax.set_title(f"{task}, n = {size:,}")
            ax.xaxis.set_major_formatter(FuncFormatter(_human))
            ax.set_xlabel("training samples seen")
            ax.set_ylabel(_metric_label(cells))
        _legend(fig, methods)
        return to_svg(fig)


def score_vs_size(analysis: Analysis) -> str:
    """One panel per (model, task): test score (mean ± seed std) against train size."""
    cases = _cases(analysis)
    methods = _methods(analysis.cells)
    with _figure(len(cases)) as (fig, axes):
        for ax, ((model, task), cells) in zip(axes, sorted(cases.items()), strict=True):
            for method in _methods(cells):
                line = sorted((c for c in cells if c.key.method == method),
                              key=lambda c: c.key.train_size)
                ax.errorbar([c.key.train_size for c in line], [c.score.mean for c in line],
                            yerr=[c.score.std or 0.0 for c in line], color=colour(method, methods),
                            lw=3 if method == FULL else 1.6, marker="o", ms=4, capsize=3)
            _log_x(ax, sorted({c.key.train_size for c in cells}))
            ax.set_title(task if len({m for m, _ in cases}) == 1 else f"{task} ({model})")
            ax.set_xlabel("training examples (log scale)")
            metric = next((c.metric for c in cells if c.metric), None) or "score"
            ax.set_ylabel(f"test {metric}")
        _legend(fig, methods)
        return to_svg(fig)


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points (lower cost, higher score), by increasing cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto(analysis: Analysis, cost: str = "trainable") -> str:
    """One panel per (model, task): cost (trainable parameters or peak memory) against test
    score; colour = method, marker = train size, dashed line = Pareto front per size."""
    label = {"trainable": "trainable parameters", "memory_mb": "peak memory, MB"}[cost]
    cases = _cases(analysis)
    methods = _methods(analysis.cells)
    sizes = sorted({c.key.train_size for c in analysis.cells})
    marker = {s: SIZE_MARKERS[i % len(SIZE_MARKERS)] for i, s in enumerate(sizes)}
    with _figure(len(cases)) as (fig, axes):
        for ax, ((model, task), cells) in zip(axes, sorted(cases.items()), strict=True):
            for size in sorted({c.key.train_size for c in cells}):
                pts = [(c.stats[cost].mean, c.score.mean, c.key.method) for c in cells
                       if c.key.train_size == size and c.stats[cost].mean
                       and c.score.mean is not None]
                for x, y, method in pts:
                    ax.scatter([x], [y], color=colour(method, methods), marker=marker[size],
                               s=36, zorder=3, edgecolors="white", linewidths=0.5)
                front = _frontier([(x, y) for x, y, _ in pts])
                if len(front) > 1:
                    ax.plot(*zip(*front, strict=True), color="#999", ls="--", lw=0.8,
                            zorder=1)
            xs = [c.stats[cost].mean for c in cells if c.stats[cost].mean]
            if xs and max(xs) / min(xs) > 20:
                _log_x(ax)
            else:
                ax.xaxis.set_major_formatter(FuncFormatter(_human))
            ax.set_title(task if len({m for m, _ in cases}) == 1 else f"{task} ({model})")
            ax.set_xlabel(label + (" (log scale)" if ax.get_xscale() == "log" else ""))
            metric = next((c.metric for c in cells if c.metric), None) or "score"
            ax.set_ylabel(f"test {metric}")
        extra = [(f"n={s}", plt.Line2D([], [], color="#555", marker=marker[s], ls="",
                                       label=f"n = {s:,}")) for s in sizes]
        _legend(fig, methods, extra)
        return to_svg(fig)


def selective(analysis: Analysis) -> str:
    """One panel per (model, task, train size) of the selective-training study: trainable
    parameters against test score, each variant labelled with the part it trains; colour =
    method, bars = seed std, dashed line = Pareto front."""
    cases: dict[tuple[str, str, int], list[Any]] = defaultdict(list)
    for v in analysis.selective:
        if v.trainable and v.score.mean is not None:
            cases[v.case].append(v)
    methods = sorted({v.method for vs in cases.values() for v in vs}, key=method_order)
    multi = len({m for m, _, _ in cases}) > 1
    with _figure(len(cases), cols=2, width=5.2, height=3.6) as (fig, axes):
        for ax, ((model, task, size), group) in zip(axes, sorted(cases.items()), strict=True):
            for v in group:
                ax.errorbar([v.trainable], [v.score.mean], yerr=[v.score.std or 0.0],
                            color=colour(v.method, methods), marker="o", ms=5, capsize=3,
                            zorder=3, ls="")
                if v.part != "-":  # methods that choose no part: the colour says enough
                    ax.annotate(v.part, (v.trainable, v.score.mean), xytext=(4, 4),
                                textcoords="offset points", fontsize=7, color="#333")
            front = _frontier([(v.trainable, v.score.mean) for v in group])
            if len(front) > 1:
                ax.plot(*zip(*front, strict=True), color="#999", ls="--", lw=0.8, zorder=1)
            _log_x(ax)
            ax.set_title(f"{task}{f' ({model})' if multi else ''}, {size:,} examples")
            ax.set_xlabel("trainable parameters (log scale)")
            ax.set_ylabel(f"test {group[0].metric or 'score'}")
        _legend(fig, methods)
        return to_svg(fig)
