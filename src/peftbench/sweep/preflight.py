"""Checks before a sweep: everything a run would otherwise find out only when it starts.

:func:`check_runnable` runs in the runs' fork server (it imports torch & co.). It extends
:func:`~peftbench.sweep.suite.check_names` with what needs the runs themselves: their
models resolve, their method variants apply to those models, their tasks' data loads,
their train sizes fit the data, and a CUDA device is there when they ask for one. A
mistake there is a usage error (exit 2) before anything runs, not one failed run per grid
cell.
"""

from __future__ import annotations

import json
import re

from peftbench.config import RunSpec
from peftbench.errors import PeftbenchError, UsageError
from peftbench.sweep.suite import (
    KeyPath,
    Locator,
    Suite,
    SuiteSpec,
    blame,
    check_names,
    problem,
    section_values,
    suite_words,
    variant_fields,
)
from peftbench.text import dotted


def check_runnable(suite: Suite, specs: list[RunSpec], model_option: str | None = None,
                   local: bool = True) -> None:
    """Raise :class:`UsageError` listing every problem of the runs ``specs`` of ``suite``.
    ``model_option`` is the ``--model`` that replaced the suite's models; ``local``: the
    runs execute on this machine (so a CUDA device must be here)."""
    check_names(suite)
    locate = Locator(suite.text, suite.source)
    spec = suite.spec
    named = {suite.task_ref(task): task for task in spec.tasks}  # a run's task -> suite's
    problems = _model_problems(locate, spec, specs, model_option)
    if local:
        problems += _device_problems(locate, spec, specs)
    if not problems:  # the methods are tried on models that resolve
        problems += _method_problems(locate, spec, specs, named)
    problems += _data_problems(locate, spec, specs, named)
    if problems:
        raise UsageError(f"suite {spec.name}: nothing was run:\n" + "\n".join(problems))


def _model_problems(locate: Locator, spec: SuiteSpec, specs: list[RunSpec],
                    model_option: str | None) -> list[str]:
    from peftbench.models import check_model

    problems = []
    for name in dict.fromkeys(run.model for run in specs):
        try:
            check_model(name)
        except PeftbenchError as exc:
            problems.append(f"--model: {exc}" if model_option is not None else
                            problem(locate, ("models", spec.models.index(name)), str(exc)))
    return problems


def _device_problems(locate: Locator, spec: SuiteSpec, specs: list[RunSpec]) -> list[str]:
    import torch

    if torch.cuda.is_available() or not any(run.device == "cuda" for run in specs):
        return []
    sections = [("defaults",), *(("task_overrides", t) for t in spec.task_overrides),
                *(("method_overrides", m) for m in spec.method_overrides)]
    return [problem(locate, (*section, "device"), "cuda, but no CUDA GPU is visible to torch "
                    "on this machine; use device: auto (or cpu), or --backend ray with a "
                    "cluster that has GPUs")
            for section in sections if section_values(spec, section).get("device") == "cuda"]


def _method_problems(locate: Locator, spec: SuiteSpec, specs: list[RunSpec],
                     named: dict[str, str]) -> list[str]:
    """Each method variant applied to a weightless copy of each model: module names and
    layer selections the model does not have. Best effort: only usage errors count (a
    method that cannot run on the meta device is tried for real when its run starts)."""
    from peftbench.methods import get_method
    from peftbench.models.skeleton import skeleton

    problems: list[str] = []
    tried: set[str] = set()
    for run in specs:
        key = json.dumps([run.model, run.method, run.method_args], sort_keys=True)
        if key in tried:
            continue
        tried.add(key)
        method = get_method(run.method)
        try:
            model, encoder_decoder = skeleton(run.model)
            method.apply(model, method.resolve_args(run.method_args),
                         encoder_decoder=encoder_decoder)
        except PeftbenchError as exc:
            path = _method_path(spec, named[run.task], run, str(exc))
            problems.append(f"{locate.where(path)}: {dotted(path)} on model {run.model}: "
                            f"{suite_words(str(exc))}")
        except Exception:  # not a usage error: left to the run
            continue
    return problems


def _method_path(spec: SuiteSpec, task: str, run: RunSpec, message: str) -> KeyPath:
    """Where the suite sets the method argument ``message`` complains about: the variant of
    ``run`` when the variant sets it, else the section that sets the method's arguments."""
    from peftbench.methods import get_method

    named = re.search(r"--method-arg (\w+)=", message)
    variants = spec.method_variants.get(run.method) or []
    for index, fields in enumerate(variant_fields(spec, task, run.method)):
        if variants and fields.get("method_args", {}) == run.method_args \
                and (named is None or named.group(1) in variants[index]):
            return ("method_variants", run.method, index)
    path = blame(spec, run.method, task, None, get_method(run.method))
    if named and path[-1] == "method_args" \
            and named.group(1) in section_values(spec, path[:-1]).get("method_args", {}):
        return (*path, named.group(1))
    return path


def _data_problems(locate: Locator, spec: SuiteSpec, specs: list[RunSpec],
                   named: dict[str, str]) -> list[str]:
    """Each task's data loads (once per task and data folder) and holds the train sizes."""
    from peftbench.tasks import load_task

    problems = []
    for task, data_dir in dict.fromkeys((run.task, run.data_dir) for run in specs):
        name = named[task]
        try:
            pool = len(load_task(task, data_dir).train)
        except PeftbenchError as exc:
            problems.append(problem(locate, ("tasks", spec.tasks.index(name)), str(exc)))
            continue
        sizes = dict.fromkeys(run.train_size for run in specs if run.task == task
                              and run.data_dir == data_dir and run.train_size is not None)
        for size in (size for size in sizes if size > pool):
            own = spec.task_train_sizes.get(name)
            path = (("task_train_sizes", name, own.index(size)) if own is not None
                    else ("train_sizes", spec.train_sizes.index(size)))
            problems.append(problem(
                locate, path, f"{size} training examples, but task '{name}' has {pool} in its "
                f"training pool; give this task smaller sizes (task_train_sizes: {{{name}: "
                f"[...]}}; null = all {pool})"))
    return problems
