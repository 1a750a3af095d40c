"""The report's figures, rendered once and shared by the HTML page and Markdown."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftbench.analysis.overview import Analysis


@dataclass
class Figure:
    key: str  # unique, file-name safe
    section: str  # sizes | pareto | selective | curves
    title: str
    caption: str
    svg: str


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def figures(analysis: Analysis) -> list[Figure]:
    """Score vs size, Pareto (parameters, memory), the selective-training study (when
    run), learning curves per task."""
    from peftbench.report import plots

    if not analysis.cells:
        return []
    out = [
        Figure("score-vs-size", "sizes", "Score against train size",
               "Test score (mean, bars = seed std) against the number of training examples.",
               plots.score_vs_size(analysis)),
        Figure("pareto-params", "pareto", "Trainable parameters against score",
               "Each point a method at a train size (marker); dashed: the Pareto front per "
               "size (nothing cheaper scores higher).", plots.pareto(analysis, "trainable")),
        Figure("pareto-memory", "pareto", "Peak memory against score",
               "Peak memory (GPU if trained on a GPU, else process RSS) against test score.",
               plots.pareto(analysis, "memory_mb")),
    ]
    if any(v.trainable and v.score.mean is not None for v in analysis.selective):
        out.append(Figure("selective", "selective", "Selective training: parameters against "
                          "score", "Each point a method trained on one part of the model "
                          "(labelled), per task and train size; bars: seed std; dashed: "
                          "the Pareto front.", plots.selective(analysis)))
    cases = sorted({(c.key.model, c.key.task) for c in analysis.cells})
    multi = len({m for m, _ in cases}) > 1
    for i, (model, task) in enumerate(cases, 1):
        name = f"{task} ({model})" if multi else task
        out.append(Figure(f"curves-{i}-{slug(task)}", "curves", f"Learning curves: {name}",
                          "Validation score against training samples seen, per train size; "
                          "mean over seeds (band: seed std); full fine-tuning thick black.",
                          plots.learning_curves(analysis, model, task)))
    return out
