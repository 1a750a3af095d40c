"""Read data files into records that remember where they came from (``file:line``).

Every problem becomes a :class:`~peftbench.errors.DataError` naming the file and line, so a
user can open the file at the right place. Formats: CSV and TSV (header row), JSON (an
array of objects), JSON Lines and Parquet; ``.bz2``, ``.gz`` and ``.xz`` compression is
undone first.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peftbench.errors import DataError

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
_COMPRESSIONS = {".bz2": bz2.decompress, ".gz": gzip.decompress, ".xz": lzma.decompress}

csv.field_size_limit(1 << 30)  # article bodies can exceed the 128 KiB default


@dataclass(frozen=True)
class Record:
    """One row of a data file: its values by column and where it is, for messages."""

    where: str  # "path:line" (text formats) or "path: row N" (Parquet)
    values: dict[str, Any]


def decompress(data: bytes, name: str, display: str) -> tuple[bytes, str]:
    """Undo ``.bz2``/``.gz``/``.xz`` compression named by the suffix; returns (data, name)."""
    for suffix, func in _COMPRESSIONS.items():
        if name.lower().endswith(suffix):
            try:
                return func(data), name[: -len(suffix)]
            except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
                raise DataError(f"{display}: cannot decompress ({suffix[1:]}): {exc}") from exc
    return data, name


def detect_format(name: str) -> str | None:
    """The table format implied by a file name (``reviews.csv.bz2`` -> ``csv``), or None."""
    lowered = name.lower()
    for suffix in _COMPRESSIONS:
        lowered = lowered.removesuffix(suffix)
    ext = lowered.rsplit(".", 1)[-1]
    ext = {"ndjson": "jsonl"}.get(ext, ext)
    return ext if ext in FORMATS else None


def decode_text(data: bytes, display: str) -> str:
    """UTF-8 text (a byte-order mark is dropped); bad bytes are reported with their line."""
    if data.startswith(b"PAR1"):
        raise DataError(f"{display}: a Parquet file (it starts with PAR1), read as text; name "
                        "it .parquet, or set format: parquet in the task YAML")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{display}:{line}: not valid UTF-8 text (byte {data[exc.start]:#04x}); "
            "save the file as UTF-8"
        ) from exc


def iter_csv(
    text: str, display: str, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first line number, fields)`` for every non-blank CSV/TSV record."""
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            span = (
                f" (a record running to line {reader.line_num})" if reader.line_num > start else ""
            )
            raise DataError(f"{display}:{start}: malformed CSV{span}: {exc}") from exc
        line, start = start, reader.line_num + 1
        if row and any(field.strip() for field in row):
            yield line, row


def iter_json_array(text: str, display: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, item)`` for each element of a top-level JSON array."""
    decoder = json.JSONDecoder()
    pos, line = _skip_ws(text, 0), 1

    def fail(at: int, what: str) -> DataError:
        return DataError(f"{display}:{text.count(chr(10), 0, at) + 1}: {what}")

    if not text.startswith("[", pos):
        raise fail(pos, "expected a JSON array of objects ('[' at the start of the file)")
    pos = _skip_ws(text, pos + 1)
    counted = 0
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{display}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        yield line, item
        pos = _skip_ws(text, end)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise fail(pos, "invalid JSON: expected ',' or ']' after an array element")
        pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_records(data: bytes, fmt: str, display: str) -> tuple[list[str] | None, list[Record]]:
    """Parse a whole file: ``(header columns or None for JSON, records)``."""
    if fmt == "parquet":
        return _read_parquet(data, display)
    text = decode_text(data, display)
    if fmt in ("csv", "tsv"):
        return _read_delimited(text, display, "\t" if fmt == "tsv" else ",")
    records = []
    if fmt == "json":
        items: Iterator[tuple[int, Any]] = iter_json_array(text, display)
    elif fmt == "jsonl":
        items = _iter_jsonl(text, display)
    else:
        raise DataError(f"{display}: unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    for line, item in items:
        if not isinstance(item, dict):
            hint = _ARRAY_IN_JSONL if fmt == "jsonl" and isinstance(item, list) else ""
            raise DataError(f"{display}:{line}: expected a JSON object per record, found "
                            f"{type(item).__name__}{hint}")
        records.append(Record(f"{display}:{line}", item))
    return None, records


_ARRAY_IN_JSONL = ("; the file holds a JSON array, not one object per line: name it .json, "
                   "or set format: json in the task YAML")


def _iter_jsonl(text: str, display: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as exc:
                hint = (_ARRAY_IN_JSONL if raw.lstrip().startswith("[") or text.lstrip(
                    "\ufeff \t\r\n").startswith("[") else "")
                raise DataError(f"{display}:{number}: invalid JSON line: {exc.msg}{hint}"
                                ) from exc


def _read_delimited(text: str, display: str, delimiter: str) -> tuple[list[str], list[Record]]:
    rows = iter_csv(text, display, delimiter)
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    first = next(rows, None)
    if first is None:
        raise DataError(f"{display}: the file is empty (expected a header row and data rows)")
    header = [name.strip() for name in first[1]]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{display}:{first[0]}: duplicate column name(s) in header: {duplicates}")
    records = []
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(
                f"{display}:{line}: expected {len(header)} {kind} columns "
                f"({', '.join(header)}), found {len(row)}"
            )
        records.append(Record(f"{display}:{line}", dict(zip(header, row, strict=True))))
    return header, records


def _read_parquet(data: bytes, display: str) -> tuple[list[str], list[Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{display}: not a readable Parquet file: {exc}") from exc
    rows = table.to_pylist()
    return table.column_names, [Record(f"{display}: row {i}", r) for i, r in enumerate(rows, 1)]


def separator_hint(header: list[Any], fmt: str | None) -> str:
    """A hint when a CSV/TSV file's one-column header looks split by another separator
    (``text;label``): which separator it seems to use and how to have it read."""
    if fmt not in ("csv", "tsv") or len(header) != 1:
        return ""
    seen = [(separator, name) for separator, name in (
        ("\t", "tabs"), (",", "commas"), (";", "semicolons"), ("|", "'|'"))
        if separator in str(header[0])]
    if not seen:
        return ""
    separator, name = seen[0]
    if (separator, fmt) == ("\t", "csv"):
        fix = "name it .tsv (or set format: tsv in the task YAML)"
    elif (separator, fmt) == (",", "tsv"):
        fix = "name it .csv (or set format: csv in the task YAML)"
    else:
        fix = "save it with commas as .csv, or with tabs as .tsv"
    return (f"; the header is one column, {header[0]!r}: the file looks separated by {name}, "
            f"but it is read as {fmt.upper()}; {fix}.")


def text_value(record: Record, column: str) -> str:
    """The stripped text of ``column``; a missing column or an empty value is a DataError."""
    if column not in record.values:
        raise DataError(
            f"{record.where}: no column '{column}'; "
            f"columns present: {', '.join(map(str, record.values)) or '(none)'}"
        )
    value = record.values[column]
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataError(f"{record.where}: column '{column}' is empty")
    return text


def require_columns(header: list[str] | None, needed: dict[str, str], display: str,
                    fmt: str | None = None) -> None:
    """Check a header holds every needed column (``{column: why}``), naming what is there
    (``fmt``: the file's format, for a hint on a CSV/TSV read with the wrong separator)."""
    if header is None:
        return
    for column, why in needed.items():
        if column not in header:
            raise DataError(
                f"{display}: missing column '{column}' ({why}); "
                f"columns present: {', '.join(header) or '(none)'}{separator_hint(header, fmt)}"
            )
