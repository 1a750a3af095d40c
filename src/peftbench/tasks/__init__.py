"""Tasks: what to train on. A task is a declarative spec plus a data source.

Public API::

    load_task(name_or_path, data_dir=None, train_size=None, seed=0, max_eval_examples=None)
        -> TaskData
    get_spec(name_or_path) -> TaskSpec          # no data loaded
    list_tasks() -> list[TaskSpec]              # the built-ins
    describe_tasks() -> list[dict[str, str]]    # name, type, metric, labels, source, description

``name_or_path`` is a built-in name (see :func:`list_tasks`) or a task YAML (a path ending
in .yaml/.yml, or any existing file; schema in :mod:`peftbench.tasks.user_schema`).
``train_size`` draws a subset of the training pool with the run ``seed`` (stratified by
class for classification); ``max_eval_examples`` caps validation and test with a fixed
seed. Validation and test never depend on ``seed`` or ``train_size``.

Targets and verbalizers carry no leading space: the trainer joins input and target.
"""

from __future__ import annotations

from pathlib import Path

from peftbench.errors import DataError, UsageError, did_you_mean
from peftbench.tasks.base import Example, TaskData, TaskSpec, TaskType
from peftbench.tasks.registry import BUILTINS
from peftbench.tasks.splits import apply_scale
from peftbench.tasks.user import load_user_task
from peftbench.tasks.user_schema import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    parse_task_file,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "GENERATION_METRICS",
    "Example",
    "TaskData",
    "TaskSpec",
    "TaskType",
    "describe_tasks",
    "get_spec",
    "list_tasks",
    "load_task",
]


def _task_file(name_or_path: str | Path) -> Path | None:
    """The task YAML meant by ``name_or_path``, or None for a built-in name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.lower().endswith((".yaml", ".yml")) or (text not in BUILTINS and path.is_file()):
        if not path.is_file():
            raise UsageError(
                f"task file not found: {path} (a task is a built-in name or a path to a task YAML)"
            )
        return path
    if text not in BUILTINS:
        hint = _file_hint(path) or (f"{did_you_mean(text, list(BUILTINS))} Or give the path "
                                    "to a task YAML.")
        raise UsageError(f"unknown task '{text}'.{hint}")
    return None


def _file_hint(path: Path) -> str:
    """What the user probably meant by a task that names a folder or a YAML without suffix."""
    for suffix in (".yaml", ".yml") if path.name else ():  # "." and "/" have no name
        if path.with_name(path.name + suffix).is_file():
            return f" Did you mean the task file {path}{suffix}?"
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        found = f" (it holds {', '.join(inside)})" if inside else " (it holds no .yaml file)"
        return f" It is a folder{found}: give the path of the task YAML itself."
    return ""


def get_spec(name_or_path: str | Path) -> TaskSpec:
    """The task's spec without loading data (a YAML path is parsed and validated)."""
    path = _task_file(name_or_path)
    return parse_task_file(path).spec if path else BUILTINS[str(name_or_path)].spec


def load_task(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    train_size: int | None = None,
    seed: int = 0,
    max_eval_examples: int | None = None,
) -> TaskData:
    """Load a task's splits, draw ``train_size`` examples with ``seed``, cap eval sets."""
    path = _task_file(name_or_path)
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    data = load_user_task(path, directory) if path else BUILTINS[str(name_or_path)].load(directory)
    _require_examples(data)
    return apply_scale(data, train_size, seed, max_eval_examples)


def _require_examples(data: TaskData) -> None:
    """Every split holds an example (a tiny file can leave none to train on once validation
    is carved out of it)."""
    sizes = {"train": len(data.train), "validation": len(data.validation),
             "test": len(data.test)}
    empty = [name for name, size in sizes.items() if not size]
    if empty:
        counts = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise DataError(f"task '{data.spec.name}' ({data.source}): no {' and no '.join(empty)} "
                        f"examples ({counts}; {'; '.join(data.notes) or 'no notes'}); give "
                        "it more data")


def list_tasks() -> list[TaskSpec]:
    """The built-in tasks' specs, in a stable order."""
    return [task.spec for task in BUILTINS.values()]


def describe_tasks() -> list[dict[str, str]]:
    """One row per built-in task: name, type, metric, labels, source, description."""
    return [
        {
            "name": t.spec.name,
            "type": t.spec.type,
            "metric": t.spec.primary_metric,
            "labels": ", ".join(t.spec.labels),
            "source": t.source,
            "description": t.spec.description,
        }
        for t in BUILTINS.values()
    ]
