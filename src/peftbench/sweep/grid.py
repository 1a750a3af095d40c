"""Expand a suite into its runs: a deterministic, ordered list of RunSpecs."""

from __future__ import annotations

import itertools

from pydantic import ValidationError

from peftbench.config import RunSpec
from peftbench.errors import UsageError
from peftbench.sweep.suite import Suite, variant_fields
from peftbench.text import dotted


def expand(suite: Suite, model: str | None = None, data_dir: str | None = None) -> list[RunSpec]:
    """The suite's runs in grid order: model, task, train size, seed, method, variant,
    learning rate.

    A task listed in ``task_train_sizes`` takes its own train sizes. Seeds come before
    methods so an interrupted sweep has whole method comparisons.
    ``model`` replaces the suite's models; ``data_dir`` is set on every run (it is not part
    of the run's identity). Runs that come out identical (same hash) are listed once.
    """
    spec = suite.spec
    models = [model] if model else spec.models
    runs: dict[str, RunSpec] = {}
    grid = ((model_name, task, size, seed, method)
            for model_name, task in itertools.product(models, spec.tasks)
            for size, seed, method in itertools.product(
                spec.task_train_sizes.get(task, spec.train_sizes), spec.seeds, spec.methods))
    for model_name, task, size, seed, method in grid:
        for fields in variant_fields(spec, task, method):
            if data_dir is not None:
                fields["data_dir"] = data_dir
            for lr in spec.lr_grid.get(method) or [fields.get("lr")]:
                try:
                    run = RunSpec(model=model_name, task=suite.task_ref(task), method=method,
                                  train_size=size,
                                  seed=seed, **{**fields, "lr": lr})
                except ValidationError as exc:
                    problems = "; ".join(f"{dotted(e['loc'])}: {e['msg']} (got "
                                         f"{e['input']!r})" for e in exc.errors())
                    raise UsageError(f"{suite.source}: suite {spec.name}: run {model_name} / "
                                     f"{task} / {method}: {problems}") from None
                runs.setdefault(run.run_hash(), run)
    return list(runs.values())
