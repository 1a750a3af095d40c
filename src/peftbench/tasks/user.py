"""A user's own task: a YAML file (schema in :mod:`peftbench.tasks.user_schema`) + data files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from peftbench.archives import ArchiveSpec, sha256_file
from peftbench.errors import DataError, PeftbenchError
from peftbench.tasks.archive_sources import read_member
from peftbench.tasks.base import Example, TaskData
from peftbench.tasks.fingerprints import files_fingerprint
from peftbench.tasks.readers import (
    Record,
    decompress,
    detect_format,
    read_records,
    require_columns,
    text_value,
)
from peftbench.tasks.splits import carve, carve_note
from peftbench.tasks.user_schema import UserTask, label_key, parse_task_file

CARVE_FRACTION = 0.1


def load_user_task(path: Path, data_dir: Path | None = None) -> TaskData:
    """Load a task YAML's data; missing validation/test splits are carved from train."""
    task = parse_task_file(path)
    notes: list[str] = []
    contents: dict[str, bytes] = {}
    splits: dict[str, list[Example]] = {}
    if task.file.files is not None:
        for split, relative in task.file.files:
            if relative is not None:
                file_path = _locate(task, split, relative, data_dir)
                raw = file_path.read_bytes()
                contents[relative] = raw
                data, name = decompress(raw, file_path.name, str(file_path))
                splits[split] = _examples(
                    task,
                    data,
                    task.file.format or detect_format(name),
                    str(file_path),
                    notes,
                    split,
                )
        source = f"task file {path} ({', '.join(contents)})"
    else:
        arc = task.file.archive
        spec = ArchiveSpec(arc.package, arc.version, arc.sha256, arc.kind)
        data, name, display = read_member(spec, arc.member, arc.inner_member, data_dir)
        contents[name] = data
        fmt = task.file.format or detect_format(name)
        splits["train"] = _examples(task, data, fmt, display, notes, "train")
        source = f"task file {path}: archive {spec.requirement} member {display}"
    _carve_missing(task, splits, notes)
    return TaskData(
        task.spec,
        splits["train"],
        splits["validation"],
        splits["test"],
        files_fingerprint(contents),
        source,
        notes,
    )


_file_hashes: dict[tuple[str, int, int], str] = {}


_parsed_tasks: dict[tuple[str, int, int], UserTask] = {}


def _parsed(path: Path) -> UserTask:
    """:func:`parse_task_file`, memoised per path, size and modification time (planning
    asks for every run's identity). The path is not resolved: a linked task file reads the
    data beside the link."""
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _parsed_tasks:
        _parsed_tasks[key] = parse_task_file(path)
    return _parsed_tasks[key]


def data_files_fingerprint(path: Path, data_dir: str | None) -> str | None:
    """sha256 over the contents of the data files a task YAML reads (found as a run would
    find them: beside the YAML, else in ``data_dir``), for the run identity: rewritten data
    is another run. ``None`` for a task read from a pinned archive (its sha256 is in the
    YAML) or one whose files cannot be found yet (the run reports that when it starts).
    Each file's hash is memoised per resolved path, size and modification time."""
    try:
        task = _parsed(path)
        if task.file.files is None:
            return None
        hashes = {}
        for split, relative in task.file.files:
            if relative is not None:
                found = _locate(task, split, relative, Path(data_dir) if data_dir else None)
                stat = found.stat()
                key = (str(found.resolve()), stat.st_size, stat.st_mtime_ns)
                if key not in _file_hashes:
                    _file_hashes[key] = sha256_file(found)
                hashes[split] = _file_hashes[key]
    except (PeftbenchError, OSError):
        return None
    blob = "".join(f"{split}\0{digest}\n" for split, digest in sorted(hashes.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def _locate(task: UserTask, split: str, relative: str, data_dir: Path | None) -> Path:
    places = [task.path.parent / relative]
    if data_dir is not None and not Path(relative).is_absolute():
        places.append(Path(data_dir) / relative)
    for place in places:
        if place.is_file():
            return place
    looked = " and ".join(str(p) for p in places)
    raise DataError(f"{task.where('files', split)}: files.{split}: file not found: {looked}")


def _examples(
    task: UserTask, data: bytes, fmt: str | None, display: str, notes: list[str], split: str
) -> list[Example]:
    fmt = fmt or "csv"
    header, records = read_records(data, fmt, display)
    is_cls = task.spec.type == "classification"
    needed = {task.column(f): f"template field {{{f}}}" for f in task.fields}
    target = task.column("label" if is_cls else "target")
    needed[target] = "the label" if is_cls else "the target text"
    if task.file.group_by:
        needed[task.file.group_by] = "group_by"
    require_columns(header, needed, display, fmt)
    examples, unknown = [], 0
    for record in records:
        fields = {f: text_value(record, task.column(f)) for f in task.fields}
        label, references = None, ()
        if is_cls:
            label = _label(task, record, target)
            if label is None:
                unknown += 1
                continue
            output = task.spec.labels[label]
        else:
            output, references = _target(record, target)
        group = _value_text(record, task.file.group_by) if task.file.group_by else None
        examples.append(
            Example(
                task.spec.template.format(**fields),
                output,
                label=label,
                references=references,
                group=group,
            )
        )
    if unknown:
        notes.append(f"{split}: skipped {unknown} row(s) whose label is not listed in labels")
    if not examples:
        why = "every row's label is unlisted" if unknown else "the file has no data rows"
        raise DataError(f"{display}: no examples ({why})")
    return examples


def _label(task: UserTask, record: Record, column: str) -> int | None:
    key = _value_text(record, column)
    if key in task.label_index:
        return task.label_index[key]
    if (alias := _as_yaml_reads_it(key)) in task.label_index:
        return task.label_index[alias]
    if task.file.skip_unknown_labels:
        return None
    if isinstance(task.file.labels, dict):
        allowed = ", ".join(task.label_index)
    else:
        allowed = f"{', '.join(task.spec.labels)} (or an index 0-{len(task.spec.labels) - 1})"
    raise DataError(
        f"{record.where}: unknown label {key!r} in column '{column}'; allowed labels: {allowed}"
    )


def _as_yaml_reads_it(text: str) -> str:
    """A CSV cell as the task YAML's label keys are normalised (:func:`label_key`): ``1.0``
    -> ``1``, ``True`` -> ``true``; so ``labels: {1.0: positive}`` matches a cell ``1.0``."""
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _value_text(record: Record, column: str) -> str:
    """A label or group value as text; numbers and booleans (JSON, Parquet) are never empty."""
    value = record.values.get(column)
    if isinstance(value, (int, float, bool)):
        return label_key(value)
    return label_key(text_value(record, column))


def _target(record: Record, column: str) -> tuple[str, tuple[str, ...]]:
    """The target text; a list value (JSON, Parquet) gives several references."""
    value = record.values.get(column)
    if isinstance(value, (list, tuple)):
        refs = tuple(" ".join(str(v).split()) for v in value if v is not None and str(v).strip())
        if not refs:
            raise DataError(f"{record.where}: column '{column}' holds no non-empty reference")
        return refs[0], refs if len(refs) > 1 else ()
    return text_value(record, column), ()


def _carve_missing(task: UserTask, splits: dict[str, list[Example]], notes: list[str]) -> None:
    pool = splits["train"]
    n = max(1, round(CARVE_FRACTION * len(pool)))
    grouped = task.file.group_by is not None
    stratify = task.spec.type == "classification" and not grouped
    how = (
        f"whole '{task.file.group_by}' groups"
        if grouped
        else "stratified by class"
        if stratify
        else "uniformly at random"
    )
    for split in ("test", "validation"):
        if split not in splits:
            splits[split], pool = carve(pool, n, split, stratify, grouped)
            notes.append(
                carve_note(
                    split,
                    len(splits[split]),
                    "the train file",
                    f"{round(100 * CARVE_FRACTION)}%, {how}",
                )
            )
    if not pool or any(not splits[split] for split in ("test", "validation")):
        groups = len({ex.group for ex in splits["train"]})
        why = (f"they fall in {groups} '{task.file.group_by}' group(s), and carving keeps "
               "groups whole" if grouped and groups < 3 else
               "too few to carve validation/test from")
        raise DataError(
            f"{task.where('files', 'train')}: {len(splits['train'])} training examples: "
            f"{why}; add files.validation and files.test"
        )
    splits["train"] = pool
