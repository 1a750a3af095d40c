"""A user's own task YAML: every file format, carving, and every bad-input message."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftbench.errors import DataError, UsageError
from peftbench.tasks import get_spec, load_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_task" / "task.yaml"

ROWS = [
    {
        "review": f"review number {i} was {'fine' if i % 3 else 'bad'}",
        "stars": "pos" if i % 3 else "neg",
        "movie": f"m{i // 5}",
    }
    for i in range(40)
]


def _write(path: Path, fmt: str, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def _task(tmp_path: Path, body: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


CLS = """\
name: stars
type: classification
files:
  train: data/train.{fmt}
  test: data/test.{fmt}
columns: {{text: review, label: stars}}
template: "Review: {{text}}\\nSentiment:"
labels: {{pos: " positive", neg: negative}}
"""


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_format_gives_the_same_task(tmp_path, fmt):
    _write(tmp_path / "data" / f"train.{fmt}", fmt, ROWS)
    _write(tmp_path / "data" / f"test.{fmt}", fmt, ROWS[:6])
    data = load_task(_task(tmp_path, CLS.format(fmt=fmt)))
    assert data.spec.labels == ("positive", "negative")  # leading space stripped
    assert len(data.test) == 6 and len(data.validation) == 4 and len(data.train) == 36
    first = data.test[0]
    assert first.input == "Review: review number 0 was bad\nSentiment:"
    assert (first.target, first.label) == ("negative", 1)
    assert Counter(e.label for e in data.validation) == {0: 3, 1: 1}  # stratified 27:13
    assert any("validation: 4 examples carved from the train file" in n for n in data.notes)
    assert len(data.fingerprint) == 64


def test_formats_share_examples_and_fingerprints_follow_bytes(tmp_path):
    results = {}
    for fmt in ("csv", "jsonl"):
        folder = tmp_path / fmt
        _write(folder / "data" / f"train.{fmt}", fmt, ROWS)
        _write(folder / "data" / f"test.{fmt}", fmt, ROWS[:6])
        results[fmt] = load_task(_task(folder, CLS.format(fmt=fmt)))
    assert results["csv"].train == results["jsonl"].train
    assert results["csv"].fingerprint != results["jsonl"].fingerprint


def test_the_shipped_example_loads():
    data = load_task(EXAMPLE)
    assert data.spec.name == "my_sentiment" and data.spec.labels == ("positive", "negative")
    assert (len(data.train), len(data.validation), len(data.test)) == (12, 12, 12)
    assert get_spec(str(EXAMPLE)) == data.spec


def test_generation_with_grouped_carving_and_compressed_file(tmp_path):
    rows = [
        {"article": f"text {i} about topic {i // 4}", "title": f"Title {i}", "topic": f"t{i // 4}"}
        for i in range(80)
    ]
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "news.jsonl.gz").write_bytes(gzip.compress(raw))
    path = _task(
        tmp_path,
        "type: generation\nfiles: {train: news.jsonl.gz}\n"
        "template: 'Article: {source}'\ncolumns: {source: article, target: title}\n"
        "group_by: topic\n",
    )
    data = load_task(path, train_size=10, seed=3)
    assert len(data.test) == 8 and len(data.validation) == 8 and len(data.train) == 10
    assert data.spec.primary_metric == "rougeL"
    topics = [{e.group for e in s} for s in (data.train, data.validation, data.test)]
    assert not (topics[1] & topics[2])
    assert load_task(path, train_size=10, seed=3).test == data.test
    assert load_task(path, train_size=20, seed=4).validation == data.validation


def test_one_group_for_all_rows_is_a_data_error(tmp_path):
    """Carving by group needs several groups (it was an IndexError)."""
    rows = [{"article": f"text {i}", "title": f"Title {i}", "topic": "same"} for i in range(400)]
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _task(tmp_path, "type: generation\nfiles: {train: news.jsonl}\n"
                 "template: 'Article: {source}'\ncolumns: {source: article, target: title}\n"
                 "group_by: topic\n")
    with pytest.raises(DataError, match="400 training examples: they fall in 1 'topic' "
                                        "group"):
        load_task(path)


def test_list_labels_values_or_indexes_and_multi_reference_targets(tmp_path):
    rows = [{"s": f"s{i}", "y": i % 2} for i in range(20)] + [{"s": "s", "y": "yes"}]
    _write(tmp_path / "a.json", "json", rows)
    path = _task(
        tmp_path,
        "type: classification\nfiles: {train: a.json}\ntemplate: '{s}'\n"
        "columns: {text: s, label: y}\nlabels: [no, yes]\n".replace("text", "s"),
    )
    data = load_task(path)
    labels = Counter(e.target for e in data.train + data.validation + data.test)
    assert labels == {"no": 10, "yes": 11}
    refs = [{"q": "a b", "t": ["b a", "a then b"]}, {"q": "c d", "t": "d c"}] * 5
    _write(tmp_path / "g.jsonl", "jsonl", refs)
    gen = load_task(
        _task(
            tmp_path,
            "type: generation\nfiles: {train: g.jsonl, validation: "
            "g.jsonl, test: g.jsonl}\ntemplate: '{q}'\ncolumns: {target: t}\n",
        )
    )
    assert gen.test[0].references == ("b a", "a then b") and gen.test[0].target == "b a"
    assert gen.test[1].refs == ("d c",)


def test_skip_unknown_labels_is_counted(tmp_path):
    _write(tmp_path / "t.csv", "csv", [*ROWS, {"review": "x", "stars": "meh", "movie": "z"}])
    path = _task(
        tmp_path,
        "type: classification\nfiles: {train: t.csv}\ntemplate: '{review}'\n"
        "columns: {label: stars}\nlabels: {pos: positive, neg: negative}\n"
        "skip_unknown_labels: true\n",
    )
    data = load_task(path)
    assert len(data.train) + len(data.validation) + len(data.test) == 40
    assert any("skipped 1 row(s)" in n for n in data.notes)


# ------------------------------------------------------------------- schema errors

GOOD = """\
type: classification
files:
  train: t.csv
template: "{review}"
columns: {label: stars}
labels: {pos: positive, neg: negative}
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            GOOD.replace("columns:", "colums:"),
            ["task.yaml:5: unknown key 'colums'. Did you mean 'columns'?"],
        ),
        (
            GOOD.replace("  train: t.csv", "  train: t.csv\n  tset: x.csv"),
            ["task.yaml:4: unknown key 'files.tset'. Did you mean 'test'?"],
        ),
        (
            GOOD.replace('template: "{review}"\n', ""),
            ["task.yaml:1: missing required key 'template'"],
        ),
        (
            GOOD.replace("type: classification", "type: regression"),
            ["task.yaml:1: type: Input should be 'classification' or 'generation'"],
        ),
        (GOOD.replace('"{review}"', '"{review"'), ["task.yaml:4: template: not a valid format"]),
        (GOOD.replace('"{review}"', '"{0}"'), ["task.yaml:4: template: field {0} must be a plain"]),
        (GOOD.replace('"{review}"', '"hello"'), ["task.yaml:4: template: has no {field}"]),
        (
            GOOD.replace("labels: {pos: positive, neg: negative}", "labels: [positive]"),
            ["task.yaml:6: labels: a classification task needs at least 2 labels"],
        ),
        (
            GOOD.replace("classification", "generation"),
            ["task.yaml:6: labels: only classification tasks have labels"],
        ),
        (GOOD + "metric: rougeL\n", ["task.yaml:7: metric: 'rougeL' is not a classification"]),
        (GOOD + "metric: acuracy\n", ["Did you mean 'accuracy'?"]),
        (
            GOOD.replace("{label: stars}", "{label: stars, txt: body}"),
            ["task.yaml:5: columns.txt: 'txt' is neither a template field (review) nor 'label'"],
        ),
        (GOOD.replace("t.csv", "t.dat"), ["task.yaml:3: files.train: cannot tell the format"]),
        (
            GOOD + "archive: {package: a, version: '1', sha256: '" + "a" * 64 + "', member: m}\n",
            ["task.yaml:1: task: give exactly one data source"],
        ),
        (
            GOOD + "archive: {package: a, version: '1', sha256: xyz, member: m}\n",
            ["task.yaml:7: archive.sha256: use 64 lowercase hexadecimal digits"],
        ),
        (
            GOOD.replace("labels: {pos: positive, neg: negative}", "labels: {pos: x, neg: ' x'}"),
            ["task.yaml:6: labels: verbalizers must be non-empty and distinct"],
        ),
        ("type: [classification\n", ["task.yaml:2: invalid YAML"]),
        ("- just a list\n", ["task.yaml:1: a task file is a YAML mapping"]),
        (GOOD + 'template: "{review} !"\n', ["task.yaml:7: key 'template' given twice"]),
        (GOOD.replace('"{review}"', '"{review!x}"'),
         ["task.yaml:4: template: not a valid format string ({review!x} has a conversion"]),
        (GOOD.replace('"{review}"', '"{review:d}"'),
         ["task.yaml:4: template: not a valid format string ({review:d} has a conversion"]),
        (GOOD.replace('"{review}"', '"{review} {label}"'),
         ["task.yaml:4: template: field {label} reads column 'stars', the label itself"]),
    ],
)
def test_schema_errors_name_the_key_and_line(tmp_path, body, expected):
    path = _task(tmp_path, body)
    with pytest.raises(UsageError) as err:
        get_spec(str(path))
    for text in expected:
        assert text in str(err.value)


# --------------------------------------------------------------------- data errors


def _cls_task(tmp_path: Path, csv_text: str, name: str = "t.csv", **extra: str) -> Path:
    (tmp_path / name).write_text(csv_text)
    body = GOOD.replace("t.csv", name) + "".join(f"{k}: {v}\n" for k, v in extra.items())
    return _task(tmp_path, body)


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("review,stars\ngood,pos\n,neg\n", "t.csv:3: column 'review' is empty"),
        (
            "review,stars\ngood,pos\nbad,meh\n",
            "t.csv:3: unknown label 'meh' in column 'stars'; allowed labels: pos, neg",
        ),
        (
            "review,stars\ngood,pos\nbad\n",
            "t.csv:3: expected 2 comma-separated columns (review, stars), found 1",
        ),
        (
            "text,stars\ngood,pos\n",
            "t.csv: missing column 'review' (template field {review}); "
            "columns present: text, stars",
        ),
        (
            "review,label\ngood,pos\n",
            "t.csv: missing column 'stars' (the label); columns present: review, label",
        ),
        ('review,stars\n"good,pos\n', "t.csv:2: malformed CSV: unexpected end of data"),
        ("", "t.csv: the file is empty"),
        ("review,stars\n", "t.csv: no examples (the file has no data rows)"),
        ("review,review\na,b\n", "t.csv:1: duplicate column name(s) in header: ['review']"),
        ("review;stars\ngood;pos\n", "columns present: review;stars; the header is one column, "
                                      "'review;stars': the file looks separated by semicolons, "
                                      "but it is read as CSV; save it with commas as .csv"),
        ("review\tstars\ngood\tpos\n", "looks separated by tabs, but it is read as CSV; name it "
                                        ".tsv (or set format: tsv in the task YAML)."),
    ],
)
def test_data_errors_name_file_line_and_column(tmp_path, csv_text, expected):
    with pytest.raises(DataError) as err:
        load_task(_cls_task(tmp_path, csv_text))
    assert expected in str(err.value)


def test_missing_data_file_says_where_it_looked(tmp_path):
    path = _task(tmp_path, GOOD)
    with pytest.raises(DataError) as err:
        load_task(path, data_dir=tmp_path / "alt")
    text = str(err.value)
    assert "task.yaml:3: files.train: file not found" in text
    assert str(tmp_path / "t.csv") in text and str(tmp_path / "alt" / "t.csv") in text


def test_relative_paths_fall_back_to_data_dir(tmp_path):
    (tmp_path / "alt").mkdir()
    (tmp_path / "alt" / "t.csv").write_text("review,stars\n" + "a,pos\nb,neg\n" * 10)
    data = load_task(_task(tmp_path, GOOD), data_dir=tmp_path / "alt")
    assert len(data.train) == 16


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "t.json",
            '[\n {"review": "a", "stars": "pos"},\n {"review": "b"}\n]',
            "t.json:3: no column 'stars'; columns present: review",
        ),
        (
            "t.json",
            '[\n {"review": "a", "stars": "pos"},\n {"review": "b" "stars": 1}\n]',
            "t.json:3: invalid JSON",
        ),
        ("t.json", '{"review": "a"}', "t.json:1: expected a JSON array of objects"),
        ("t.json", '[\n "just text"\n]', "t.json:2: expected a JSON object per record"),
        (
            "t.jsonl",
            '{"review": "a", "stars": "pos"}\n\n{"review": "b", "stars": "bad"}\n',
            "t.jsonl:3: unknown label 'bad'",
        ),
        ("t.jsonl", '{"review": "a", "stars": "pos"}\n{oops}\n', "t.jsonl:2: invalid JSON line"),
        ("t.parquet", "not parquet", "t.parquet: not a readable Parquet file"),
        ("t.jsonl", '[{"review": "a", "stars": "pos"},\n {"review": "b", "stars": "neg"}]\n',
         "t.jsonl:1: invalid JSON line: Expecting value; the file holds a JSON array"),
        ("t.jsonl", "[{\"review\": \"a\", \"stars\": \"pos\"}]\n",
         "found list; the file holds a JSON array, not one object per line: name it .json"),
    ],
)
def test_json_and_parquet_errors(tmp_path, name, content, expected):
    with pytest.raises(DataError) as err:
        load_task(_cls_task(tmp_path, content, name=name))
    assert expected in str(err.value)


def test_a_parquet_file_named_csv_says_so(tmp_path):
    _write(tmp_path / "t.parquet", "parquet", [{"review": "a", "stars": "pos"}])
    (tmp_path / "t.parquet").rename(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"t.csv: a Parquet file \(it starts with PAR1\), read "
                                        r"as text; name it .parquet, or set format: parquet"):
        load_task(_task(tmp_path, GOOD))


def test_parquet_rows_are_located_by_row_number(tmp_path):
    _write(
        tmp_path / "t.parquet",
        "parquet",
        [{"review": "a", "stars": "pos"}, {"review": "", "stars": "neg"}],
    )
    with pytest.raises(DataError, match=r"t.parquet: row 2: column 'review' is empty"):
        load_task(_task(tmp_path, GOOD.replace("t.csv", "t.parquet")))


def test_too_few_rows_to_carve(tmp_path):
    with pytest.raises(DataError, match="too few to carve validation/test"):
        load_task(_cls_task(tmp_path, "review,stars\na,pos\nb,neg\n"))


def test_quote_error_inside_a_record_points_at_its_start(tmp_path):
    text = 'review,stars\ngood,pos\n"multi\nline"x,neg\n'
    with pytest.raises(DataError) as err:
        load_task(_cls_task(tmp_path, text))
    assert "t.csv:3: malformed CSV (a record running to line 4)" in str(err.value)


@pytest.mark.parametrize(("labels", "cells"), [
    ("{0.0: negative, 1.0: positive}", ("0.0", "1.0")),
    ("{True: positive, False: negative}", ("True", "False")),
    ("{1: positive, 0: negative}", ("1.0", "0")),
])
def test_label_cells_match_label_keys_written_the_same_way(tmp_path, labels, cells):
    """YAML reads the key 1.0 as 1 and True as true; a CSV cell typed the same way was an
    unknown label, with an error that contradicted the file."""
    rows = "".join(f"text {i},{cells[i % 2]}\n" for i in range(40))
    path = _cls_task(tmp_path, "review,stars\n" + rows)
    path.write_text(path.read_text().replace("{pos: positive, neg: negative}", labels))
    data = load_task(path)
    assert {e.target for e in data.train} == {"positive", "negative"}


def test_a_data_folder_given_for_a_file_is_named_as_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match=r"task.yaml:3: files.train: 'd' is a folder; give the "
                                         r"path of a data file in it"):
        load_task(_task(tmp_path, GOOD.replace("t.csv", "d")))
