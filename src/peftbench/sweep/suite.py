"""Suites: YAML files describing a grid of runs, validated with the line of every mistake.

A suite names the grid axes (models x tasks x train sizes x seeds x methods, plus optional
per-task train sizes, per-method variants and learning-rate grids) and the other
:class:`RunSpec` fields: ``defaults``, updated by ``task_overrides[task]``, then by
``method_overrides[method]`` (``method_args`` merged key by key; ``max_steps`` and
``epochs`` are one budget, so a section setting either replaces both), then by one of
``method_variants[method]`` (method arguments, e.g. which layers to train), then by
``lr_grid[method]``. Unknown keys and bad values are :class:`UsageError`s that say
``file:line: key: what is wrong``.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftbench import yaml_text
from peftbench.config import RunSpec
from peftbench.errors import UsageError, did_you_mean
from peftbench.text import NAME_PATTERN, dotted, validation_message

# RunSpec fields that are grid axes: set by the suite's lists, not in defaults/overrides.
AXES = {"model": "models", "task": "tasks", "method": "methods", "train_size": "train_sizes",
        "seed": "seeds"}
SETTABLE = [name for name in RunSpec.model_fields if name not in AXES]
# One training budget: a section that sets either (not to null) replaces both from less
# specific ones.
BUDGET = ("max_steps", "epochs")

KeyPath = tuple[str | int, ...]


class Execution(BaseModel):
    """How the suite runs by default (``peftbench run`` flags override)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int | None = Field(default=None, ge=1, description="runs at a time")
    cpus_per_run: int | None = Field(default=None, ge=1, description="torch threads per run")


class SuiteSpec(BaseModel):
    """The content of a suite YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN,
                      description="the suite's name: results are filed under it")
    description: str = ""
    models: list[str] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    train_sizes: list[Annotated[int, Field(ge=1)] | None] = Field(
        default=[None], min_length=1, description="examples drawn from train; null = all")
    task_train_sizes: dict[str, list[Annotated[int, Field(ge=1)] | None]] = Field(
        default_factory=dict, description="train sizes of one task, instead of train_sizes "
        "(e.g. a task whose training pool is smaller than the largest size)")
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default=[0], min_length=1, description="torch's seed range")
    defaults: dict[str, Any] = Field(default_factory=dict,
                                     description="RunSpec fields for every run")
    task_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="RunSpec fields per task (over defaults)")
    method_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="RunSpec fields per method (over task_overrides)")
    method_variants: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="per-method lists of method_args: one run for each "
        "(e.g. LoRA on every layer and on the last six)")
    lr_grid: dict[str, list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]] = Field(
        default_factory=dict, description="per-method learning rates: one run for each")
    execution: Execution = Field(default_factory=Execution)


class Suite(BaseModel):
    """A validated suite and where it came from (for messages)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: SuiteSpec
    source: str
    text: str
    folder: Path | None = None  # of a suite file: where its relative task paths start

    def task_ref(self, task: str) -> str:
        """``task`` as a run names it: a relative task-file path is taken from the suite
        file's folder (where it exists there), like the paths inside a task file."""
        path = Path(task).expanduser()
        if self.folder is None or path.is_absolute() \
                or not task.lower().endswith((".yaml", ".yml")):
            return task
        beside = self.folder / path
        return str(beside) if beside.is_file() else task


# -- locating mistakes in the YAML text --------------------------------------------------
class Locator:
    """Maps a key path (``("defaults", "lr")``) to ``file:line`` using the YAML node tree."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.root = yaml_text.compose(text)

    def line(self, path: KeyPath, at_key: bool = False) -> int:
        node = self.root
        if node is None:
            return 1
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        child = key if at_key and part == path[-1] else value
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                    and part < len(node.value):
                child = node.value[part]
            if child is None:
                break
            node = child
        return node.start_mark.line + 1

    def where(self, path: KeyPath, at_key: bool = False) -> str:
        return f"{self.source}:{self.line(path, at_key)}"

    def duplicate_keys(self) -> list[str]:
        """``file:line: key`` for keys given twice in one mapping (YAML keeps the last)."""
        return yaml_text.duplicate_keys(self.root, self.source)


def problem(locate: Locator, path: KeyPath, message: str, at_key: bool = False) -> str:
    """``file:line: key.path: message`` for the value (or, ``at_key``, the key) at ``path``."""
    return f"{locate.where(path, at_key)}: {dotted(path)}: {suite_words(message)}"


def suite_words(message: str) -> str:
    """A method's message as a suite says it: ``--method-arg r=4`` is ``r=4`` (of the
    ``method_args`` the message's location names)."""
    return re.sub(r"--method-arg (\w+)=", r"\1=", message)


def _list_problems(locate: Locator, path: KeyPath, items: list[Any], empty: str,
                   duplicate: str) -> list[str]:
    """An empty list, and each item that repeats an earlier one, located in the file."""
    problems = [] if items else [problem(locate, path, empty)]
    problems += [problem(locate, (*path, index), duplicate.format(item=item))
                 for index, item in enumerate(items) if item in items[:index]]
    return problems


# -- validation ----------------------------------------------------------------------------
def _schema_problems(exc: ValidationError, locate: Locator) -> list[str]:
    problems = []
    for error in exc.errors():
        path = tuple(error["loc"])
        if path and path[-1] == "[key]":  # a key that is not text: said by _field_problems
            continue
        if error["type"] == "extra_forbidden":
            key, parent = str(path[-1]), path[:-1]
            within = {(): SuiteSpec, ("execution",): Execution}.get(parent)
            hint = did_you_mean(key, list(within.model_fields)) if within else ""
            problems.append(problem(locate, path, f"unknown key '{key}'.{hint}", at_key=True))
        elif error["type"] == "missing":
            problems.append(f"{locate.where(path[:-1])}: missing required key "
                            f"'{dotted(path)}'")
        else:
            problems.append(problem(locate, path,
                                    f"{validation_message(error)} (got {error['input']!r})"))
    return problems


def _field_problems(values: dict[str, Any], path: KeyPath, locate: Locator) -> list[str]:
    """Check a ``defaults`` / ``*_overrides`` mapping: RunSpec fields, valid values."""
    problems = []
    for key in values:
        if not isinstance(key, str):
            problems.append(problem(locate, (*path, key), f"{key!r} is not a setting name: "
                                    f"use one of {', '.join(SETTABLE)}", at_key=True))
        elif key in AXES:
            problems.append(problem(locate, (*path, key), f"'{key}' is a grid axis: list it "
                                    f"under '{AXES[key]}' instead.", at_key=True))
        elif key not in RunSpec.model_fields:
            problems.append(problem(locate, (*path, key), f"unknown key '{key}'."
                                    f"{did_you_mean(key, SETTABLE)}", at_key=True))
    if all(values.get(key) is not None for key in BUDGET):
        problems.append(problem(locate, (*path, BUDGET[1]), "set max_steps or epochs, not "
                                "both: one section gives one training budget", at_key=True))
    valid = {k: v for k, v in values.items() if k in SETTABLE}
    try:
        RunSpec(model="m", task="t", method="x", **valid)
    except ValidationError as exc:
        for error in exc.errors():
            problems.append(problem(locate, (*path, *error["loc"]),
                                    f"{validation_message(error)} (got {error['input']!r})"))
    return problems


def _settings_problems(data: dict[str, Any], locate: Locator) -> list[str]:
    """Field problems in ``defaults`` and the overrides (checked even when other parts of
    the file are wrong, so one pass reports everything)."""
    problems = []
    if isinstance(data.get("defaults"), dict):
        problems += _field_problems(data["defaults"], ("defaults",), locate)
    for section in ("task_overrides", "method_overrides"):
        if isinstance(data.get(section), dict):
            for key, values in data[section].items():
                if isinstance(values, dict):
                    problems += _field_problems(values, (section, key), locate)
    return problems


def _grid_problems(spec: SuiteSpec, locate: Locator) -> list[str]:
    problems = []
    for axis in ("models", "tasks", "methods", "train_sizes", "seeds"):  # never empty
        problems += _list_problems(locate, (axis,), getattr(spec, axis), "",
                                   "duplicate entry {item!r}")
    for task, sizes in spec.task_train_sizes.items():
        problems += _list_problems(locate, ("task_train_sizes", task), sizes,
                                   "empty list of train sizes", "duplicate entry {item!r}")
    for section, names, axis in (("task_overrides", spec.tasks, "tasks"),
                                 ("task_train_sizes", spec.tasks, "tasks"),
                                 ("method_overrides", spec.methods, "methods"),
                                 ("method_variants", spec.methods, "methods"),
                                 ("lr_grid", spec.methods, "methods")):
        for name in getattr(spec, section):
            if name not in names:
                problems.append(problem(locate, (section, name), f"'{name}' is not one of "
                                        f"this suite's {axis} ({', '.join(names)}).",
                                        at_key=True))
    for method, variants in spec.method_variants.items():
        problems += _list_problems(locate, ("method_variants", method), variants,
                                   "empty list: give at least one set of method arguments "
                                   "({} = the defaults)", "duplicate variant")
    for method, lrs in spec.lr_grid.items():
        if not lrs:
            problems.append(problem(locate, ("lr_grid", method), "empty learning-rate list"))
        if len(set(lrs)) != len(lrs):
            problems.append(problem(locate, ("lr_grid", method), "duplicate learning rates"))
        if "lr" in spec.method_overrides.get(method, {}):
            problems.append(problem(locate, ("method_overrides", method, "lr"),
                                    f"conflicts with lr_grid.{method}: give one or the other.",
                                    at_key=True))
    return problems


def check_names(suite: Suite) -> None:
    """Check task names, method names and method arguments against the registries.

    Imports the methods (torch, peft): call it before a sweep, not for a quick parse.
    """
    from peftbench.methods import get_method
    from peftbench.tasks import get_spec

    locate = Locator(suite.text, suite.source)
    spec = suite.spec
    problems = []
    for index, task in enumerate(spec.tasks):
        try:
            get_spec(suite.task_ref(task))
        except UsageError as exc:
            problems.append(problem(locate, ("tasks", index), str(exc)))
    for index, name in enumerate(spec.methods):
        try:
            method = get_method(name)
        except UsageError as exc:
            problems.append(problem(locate, ("methods", index), str(exc)))
            continue
        problems += _method_args_problems(spec, name, method, locate)
    if problems:
        raise UsageError("suite " + suite.spec.name + ":\n" + "\n".join(problems))


def _method_args_problems(spec: SuiteSpec, name: str, method: Any,
                          locate: Locator) -> list[str]:
    """The first invalid method-argument set of method ``name``, located in the file."""
    variants = spec.method_variants.get(name)
    for task in spec.tasks:
        for index, fields in enumerate(variant_fields(spec, task, name)):
            try:
                method.resolve_args(fields.get("method_args", {}))
            except UsageError as exc:
                path = blame(spec, name, task, None if variants is None else index, method)
                return [problem(locate, path, str(exc))]
    return []


def blame(spec: SuiteSpec, name: str, task: str, variant: int | None,
          method: Any) -> KeyPath:
    """Where a method-argument mistake is: the variant when its own arguments are wrong (or
    nothing else sets any), else the most specific section that sets ``method_args``, else
    the method's entry in ``methods``."""
    shared = next((p for p in (("method_overrides", name), ("task_overrides", task),
                               ("defaults",)) if "method_args" in section_values(spec, p)), None)
    if variant is not None:
        try:
            method.resolve_args(spec.method_variants[name][variant])
            own_ok = True
        except UsageError:
            own_ok = False
        if not own_ok or shared is None:
            return ("method_variants", name, variant)
    if shared is not None:
        return (*shared, "method_args")
    return ("methods", spec.methods.index(name))


def section_values(spec: SuiteSpec, path: KeyPath) -> dict[str, Any]:
    """The settings of ``("defaults",)`` or ``(section, name)`` (e.g. a method override)."""
    if path == ("defaults",):
        return spec.defaults
    return getattr(spec, str(path[0])).get(path[1], {})


def run_fields(spec: SuiteSpec, task: str, method: str) -> dict[str, Any]:
    """The RunSpec fields of ``task`` x ``method``: defaults < task_overrides <
    method_overrides, ``method_args`` merged key by key (the lr grid comes on top)."""
    layers = [spec.defaults, spec.task_overrides.get(task, {}),
              spec.method_overrides.get(method, {})]
    fields: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for layer in layers:
        if any(layer.get(key) is not None for key in BUDGET):  # replaces both
            for key in BUDGET:
                fields.pop(key, None)
        fields.update(layer)
        args.update(layer.get("method_args", {}))
    if args:
        fields["method_args"] = args
    return fields


def variant_fields(spec: SuiteSpec, task: str, method: str) -> list[dict[str, Any]]:
    """The RunSpec fields of each variant of ``task`` x ``method``: :func:`run_fields` with
    one ``method_variants[method]`` entry merged into ``method_args`` (one entry, the fields
    themselves, without variants)."""
    fields = run_fields(spec, task, method)
    out = []
    for variant in spec.method_variants.get(method) or [{}]:
        args = {**fields.get("method_args", {}), **variant}
        out.append({**fields, "method_args": args} if args else dict(fields))
    return out


# -- loading ---------------------------------------------------------------------------------
def shipped_suites() -> list[str]:
    """Names of the suites that come with peftbench."""
    folder = resources.files("peftbench").joinpath("suites")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_suite(text: str, source: str, default_name: str = "suite") -> Suite:
    """Validate suite YAML ``text``; ``source`` names it in messages (``file``)."""
    try:
        locate = Locator(text, source)
        data = yaml_text.load(text)
    except yaml.YAMLError as exc:
        line, what = yaml_text.problem(exc)
        raise UsageError(f"{source}{line}: not valid YAML: {what}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{source}:1: a suite is a YAML mapping with keys "
                         f"{', '.join(SuiteSpec.model_fields)}.")
    problems = locate.duplicate_keys()
    if "name" not in data:  # the file's name, made a valid suite name
        data["name"] = re.sub(r"[^A-Za-z0-9_.-]+", "_", default_name).strip("_.-") or "suite"
    problems += _settings_problems(data, locate)
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        problems += _schema_problems(exc, locate)
    else:
        problems += _grid_problems(spec, locate)
    if problems:
        problems.sort(key=lambda text: int(text[len(source) + 1:].split(":", 1)[0] or 0))
        raise UsageError("invalid suite:\n" + "\n".join(problems))
    return Suite(spec=spec, source=source, text=text)


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name (``smoke``, ``quickstart``, ``selective``,
    ``paper``) or a YAML file."""
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    if path.is_file() or text_name.endswith((".yaml", ".yml")) or "/" in text_name:
        if not path.is_file():
            raise UsageError(f"suite file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read suite file {path}: {exc} (a suite is a UTF-8 "
                             "YAML text file)") from None
        suite = parse_suite(text, str(path), default_name=path.stem)
        return suite.model_copy(update={"folder": path.resolve().parent})
    names = shipped_suites()
    if text_name not in names:
        raise UsageError(f"unknown suite '{text_name}'.{did_you_mean(text_name, names)} "
                         "Or give the path to a suite YAML.")
    shipped = resources.files("peftbench").joinpath("suites", f"{text_name}.yaml")
    return parse_suite(shipped.read_text(), str(shipped), default_name=text_name)
