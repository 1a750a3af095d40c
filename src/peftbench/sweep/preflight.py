"""Checks before a sweep: everything a run would otherwise find out only when it starts.

:func:`check_runnable` runs in the runs' fork server (it imports torch & co.). It extends
:func:`~peftbench.sweep.suite.check_names` with what needs the runs themselves: their
models resolve, their tasks' data loads, and their train sizes fit the data. A mistake
there is a usage error (exit 2) before anything runs, not one failed run per grid cell.
"""

from __future__ import annotations

import json
import re
from typing import Any

from peftbench.config import RunSpec
from peftbench.errors import PeftbenchError, UsageError
from peftbench.sweep.suite import (
    KeyPath,
    Suite,
    _blame,
    _dotted,
    _Locator,
    _section,
    check_names,
    variant_fields,
)


def check_runnable(suite: Suite, specs: list[RunSpec], model_option: str | None = None,
                   local: bool = True) -> None:
    """Raise :class:`UsageError` listing every problem of the runs ``specs`` of ``suite``:
    names (see ``check_names``), models, method arguments on the models, task data, train
    sizes, and (``local``: the runs execute on this machine) a CUDA device this machine
    lacks. ``model_option`` is the ``--model`` that replaced the suite's models."""
    check_names(suite)
    where = _Locator(suite.text, suite.source).where
    spec = suite.spec
    problems = [_where_model(where, spec.models, name, model_option) + f": {message}"
                for name, message in _model_problems(specs)]
    if local:
        problems += _device_problems(spec, specs, where)
    if not problems:  # the methods are tried on models that resolve
        problems += _method_problems(suite, specs, where)
    problems += _data_problems(suite, specs, where)
    if problems:
        raise UsageError(f"suite {spec.name}: nothing was run:\n" + "\n".join(problems))


def _device_problems(spec: Any, specs: list[RunSpec], where) -> list[str]:
    import torch

    if torch.cuda.is_available() or not any(s.device == "cuda" for s in specs):
        return []
    sections = [("defaults",), *(("task_overrides", t) for t in spec.task_overrides),
                *(("method_overrides", m) for m in spec.method_overrides)]
    found = [(*section, "device") for section in sections
             if (spec.defaults if section == ("defaults",) else
                 getattr(spec, section[0])[section[1]]).get("device") == "cuda"]
    return [f"{where(path)}: {_dotted(path)}: cuda, but no CUDA GPU is visible to torch on "
            "this machine; use device: auto (or cpu), or --backend ray with a cluster that "
            "has GPUs" for path in found]


def _where_model(where, models: list[str], name: str, model_option: str | None) -> str:
    if model_option is not None:
        return "--model"
    index = models.index(name)
    return f"{where(('models', index))}: models[{index}]"


def _model_problems(specs: list[RunSpec]) -> list[tuple[str, str]]:
    from peftbench.models import check_model

    problems = []
    for name in dict.fromkeys(spec.model for spec in specs):
        try:
            check_model(name)
        except PeftbenchError as exc:
            problems.append((name, str(exc)))
    return problems


def _method_problems(suite: Suite, specs: list[RunSpec], where) -> list[str]:
    """Each method variant applied to a weightless copy of each model: module names and
    layer selections the model does not have. Best effort: only usage errors count (a
    method that cannot run on the meta device is tried for real when its run starts)."""
    from peftbench.methods import get_method
    from peftbench.models.skeleton import skeleton

    spec = suite.spec
    named = {suite.task_ref(task): task for task in spec.tasks}
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
            problems.append(f"{where(path)}: {_dotted(path)} on model {run.model}: {exc}")
        except Exception:  # not a usage error: left to the run
            continue
    return problems


def _method_path(spec: Any, task: str, run: RunSpec, message: str) -> KeyPath:
    """Where the suite sets the method argument ``message`` complains about: the variant of
    ``run`` when the variant sets it, else the section that sets the method's arguments."""
    from peftbench.methods import get_method

    named = re.search(r"--method-arg (\w+)=", message)
    variants = spec.method_variants.get(run.method) or []
    for index, fields in enumerate(variant_fields(spec, task, run.method)):
        if variants and fields.get("method_args", {}) == run.method_args \
                and (named is None or named.group(1) in variants[index]):
            return ("method_variants", run.method, index)
    path = _blame(spec, run.method, task, None, get_method(run.method))
    if named and path[-1] == "method_args" \
            and named.group(1) in _section(spec, path[:-1]).get("method_args", {}):
        return (*path, named.group(1))
    return path


def _data_problems(suite: Suite, specs: list[RunSpec], where) -> list[str]:
    """Each task's data loads (once per task and data folder) and holds the train sizes."""
    from peftbench.tasks import load_task

    spec = suite.spec
    named = {suite.task_ref(task): task for task in spec.tasks}  # a run's task -> suite's
    problems = []
    for task, data_dir in dict.fromkeys((s.task, s.data_dir) for s in specs):
        index = spec.tasks.index(named[task])
        try:
            pool = len(load_task(task, data_dir).train)
        except PeftbenchError as exc:
            problems.append(f"{where(('tasks', index))}: tasks[{index}]: {exc}")
            continue
        sizes = dict.fromkeys(s.train_size for s in specs if s.task == task
                              and s.data_dir == data_dir and s.train_size is not None)
        for size in sizes:
            if size > pool:
                path = _size_path(suite, named[task], size)
                problems.append(
                    f"{where(path)}: {_dotted(path)}: {size} training examples, but "
                    f"task '{named[task]}' has {pool} in its training pool; give this task "
                    f"smaller sizes (task_train_sizes: {{{named[task]}: [...]}}; null = all "
                    f"{pool})")
    return problems


def _size_path(suite: Suite, task: str, size: int) -> KeyPath:
    own = suite.spec.task_train_sizes.get(task)
    if own is not None:
        return ("task_train_sizes", task, own.index(size))
    return ("train_sizes", suite.spec.train_sizes.index(size))


