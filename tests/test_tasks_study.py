"""The study's four tasks read from their upstream release files (real CoLA/E2E copies,
small synthetic AG News/SAMSum files in the upstream layout)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from peftbench.errors import DataError, UsageError
from peftbench.tasks import load_task
from peftbench.tasks.study import clean_ag_news

SHARED = Path(
    os.environ.get("PEFTBENCH_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
needs_cola = pytest.mark.skipif(
    not (SHARED / "cola" / "cola_public" / "raw" / "in_domain_train.tsv").is_file(),
    reason=f"real CoLA release not found under {SHARED} (set PEFTBENCH_SHARED_DATA)",
)
needs_e2e = pytest.mark.skipif(
    not (SHARED / "e2e" / "e2e-dataset" / "trainset.csv").is_file(),
    reason=f"real E2E release not found under {SHARED} (set PEFTBENCH_SHARED_DATA)",
)


# ------------------------------------------------------------------------------ CoLA


@needs_cola
def test_cola_real_release_counts_and_splits():
    data = load_task("cola", data_dir=SHARED / "cola")
    # in_domain_train 8,551 rows = 500 carved validation + 8,051 train pool
    assert len(data.validation) == 500 and len(data.train) == 8051
    # test = in_domain_dev (527) + out_of_domain_dev (516) = GLUE CoLA validation (1,043)
    assert len(data.test) == 527 + 516
    assert data.spec.labels == ("unacceptable", "acceptable")
    assert data.spec.primary_metric == "mcc"
    assert all(ex.target == data.spec.labels[ex.label] for ex in data.train[:50])
    assert not any(ex.target.startswith(" ") for ex in data.train)
    # stratified carving keeps the class ratio (about 70% acceptable)
    share = Counter(ex.label for ex in data.validation)[1] / 500
    pool_share = Counter(ex.label for ex in data.train)[1] / 8051
    assert abs(share - pool_share) < 0.01
    assert any("carved" in note for note in data.notes)


@needs_cola
def test_cola_found_from_any_parent_and_skips_tokenized_copies():
    top = load_task("cola", data_dir=SHARED)
    deep = load_task("cola", data_dir=SHARED / "cola" / "cola_public" / "raw")
    assert top.fingerprint == deep.fingerprint
    assert "raw" in top.source and "tokenized" not in top.source
    # the tokenised copy splits contractions ("wo n't"); the raw release does not
    assert not any(" n't" in e.input for e in top.train + top.validation + top.test)


@needs_cola
def test_cola_carving_is_deterministic_and_disjoint():
    a = load_task("cola", data_dir=SHARED / "cola")
    b = load_task("cola", data_dir=SHARED / "cola", seed=7)
    assert [e.input for e in a.validation] == [e.input for e in b.validation]
    assert [e.input for e in a.test] == [e.input for e in b.test]
    # the 500 validation rows are rows of in_domain_train, none of them left in train
    train_rows = Counter(e.input for e in a.train)
    val_rows = Counter(e.input for e in a.validation)
    raw = SHARED / "cola" / "cola_public" / "raw" / "in_domain_train.tsv"
    total = Counter(
        a.spec.template.format(sentence=line.split("\t")[3].strip())
        for line in raw.read_text().splitlines()
    )
    assert train_rows + val_rows == total


@needs_cola
def test_cola_from_the_release_zip(tmp_path):
    archive = tmp_path / "cola_public_1.1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((SHARED / "cola").rglob("*.tsv")):
            zf.write(path, path.relative_to(SHARED / "cola").as_posix())
    zipped = load_task("cola", data_dir=tmp_path)
    plain = load_task("cola", data_dir=SHARED / "cola")
    assert zipped.fingerprint == plain.fingerprint
    assert [e.input for e in zipped.validation] == [e.input for e in plain.validation]
    assert "cola_public_1.1.zip!cola_public/raw " in zipped.source


def _cola_copy(tmp_path: Path, bad_line: str | None = None, at: int = 17) -> Path:
    raw = tmp_path / "cola_public" / "raw"
    raw.mkdir(parents=True)
    rows = [f"src\t{i % 2}\t\tSentence number {i} is here." for i in range(40)]
    if bad_line is not None:
        rows[at - 1] = bad_line
    (raw / "in_domain_train.tsv").write_text("\n".join(rows) + "\n")
    (raw / "in_domain_dev.tsv").write_text("\n".join(rows[:10]) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            "gj04\t1",
            "expected 4 tab-separated columns (source, label, author's mark, sentence), found 2",
        ),
        ("gj04\t2\t\tA sentence.", "label (column 2) is '2'; expected 0 (unacceptable) or 1"),
        ("gj04\t1\t\t  ", "sentence (column 4) is empty"),
    ],
)
def test_cola_malformed_rows_name_file_and_line(tmp_path, bad, message):
    root = _cola_copy(tmp_path, bad)
    with pytest.raises(DataError) as err:
        load_task("cola", data_dir=root)
    text = str(err.value)
    assert "cola_public/raw/in_domain_train.tsv:17: " in text
    assert message in text


def test_cola_copy_too_small_to_train_on_is_a_data_error(tmp_path):
    """500 sentences are kept for validation: 40 leave nothing to train on (a run failed
    with 'max() arg is an empty sequence')."""
    with pytest.raises(DataError) as err:
        load_task("cola", data_dir=_cola_copy(tmp_path))
    text = " ".join(str(err.value).split())
    assert "task 'cola'" in text and "no train examples (train 0, validation 40, test 10;" in text
    assert "validation: 40 examples carved from in_domain_train.tsv" in text


def test_missing_release_files_say_what_and_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_task("cola", data_dir=tmp_path)
    assert "no in_domain_train.tsv in" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_task("cola", data_dir=tmp_path / "nowhere")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "in_domain_train.tsv").write_text("a\t1\t\tA b.\n")
    with pytest.raises(DataError, match=r"but not in_domain_dev\.tsv beside it"):
        load_task("cola", data_dir=tmp_path)


def test_two_copies_are_ambiguous(tmp_path):
    _cola_copy(tmp_path / "a")
    _cola_copy(tmp_path / "b")
    with pytest.raises(DataError, match=r"several copies of in_domain_train\.tsv"):
        load_task("cola", data_dir=tmp_path)


# ------------------------------------------------------------------------------- E2E


@needs_e2e
def test_e2e_real_release_counts_and_references():
    data = load_task("e2e_nlg", data_dir=SHARED / "e2e")
    assert len(data.train) == 42_061
    assert len({ex.group for ex in data.train}) == 4_862
    assert len(data.validation) == 547 and len(data.test) == 630
    # one test example per MR; its references are all 4,693 rows, in file order
    assert sum(len(ex.refs) for ex in data.test) == 4_693
    assert sum(len(ex.refs) for ex in data.validation) == 4_672
    first = data.test[0]
    assert first.group == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert first.target == first.references[0]
    assert first.references[:2] == (
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    )
    assert "£" in " ".join(ex.input for ex in data.train[:200])  # UTF-8 decoded
    assert all(ex.target and ex.target == ex.target.strip() for ex in data.train)
    assert all("\r" not in ex.target and "\n" not in ex.target for ex in data.train)
    assert data.spec.primary_metric == "rougeL" and data.spec.type == "generation"


@needs_e2e
def test_e2e_subsample_and_caps(tmp_path):
    data = load_task("e2e_nlg", data_dir=SHARED, train_size=200, seed=3, max_eval_examples=50)
    assert len(data.train) == 200 and len(data.validation) == 50 and len(data.test) == 50
    assert all(len(ex.refs) >= 1 for ex in data.test)


def test_e2e_malformed_csv(tmp_path):
    root = tmp_path / "e2e-dataset"
    root.mkdir()
    good = 'mr,ref\n"name[A], food[B]","A serves B."\n'
    for name in ("devset.csv", "testset_w_refs.csv"):
        (root / name).write_text(good)
    (root / "trainset.csv").write_text(good + '"name[C]","C, a place."\n"name[D]"\n')
    with pytest.raises(DataError, match=r"trainset.csv:4: expected 2 comma-separated columns"):
        load_task("e2e_nlg", data_dir=tmp_path)
    (root / "trainset.csv").write_text(good + '"name[C]",""\n')
    with pytest.raises(DataError, match=r"trainset.csv:3: column 'ref' is empty"):
        load_task("e2e_nlg", data_dir=tmp_path)
    (root / "trainset.csv").write_text("meaning,text\nx,y\n")
    with pytest.raises(DataError, match=r"trainset.csv:1: expected the header 'mr,ref'"):
        load_task("e2e_nlg", data_dir=tmp_path)


# --------------------------------------------------------------------------- AG News


def _ag_news(tmp_path: Path, rows_per_class: int, with_train: bool = True) -> Path:
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    lines = []
    for i in range(rows_per_class * 4):
        label = i % 4 + 1
        lines.append(f'"{label}","Title {i} #39;s","Story {i} costs \\$5 and quot;more quot;"')
    (folder / "test.csv").write_text("\n".join(lines) + "\n")
    if with_train:
        (folder / "train.csv").write_text("\n".join(lines * 2) + "\n")
    (folder / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    return tmp_path


def test_ag_news_cleaning():
    assert clean_ag_news("Wall St. #39;s \\$5 quot;deal quot; A &amp; B") == (
        'Wall St. \'s $5 "deal " A & B'
    )
    assert clean_ag_news("dwindling\\band of cynics") == "dwindling band of cynics"
    assert clean_ag_news("&lt;b&gt;Bold&lt;/b&gt; #36;10") == "<b>Bold</b> $10"


def test_ag_news_with_train_and_test(tmp_path):
    data = load_task("ag_news", data_dir=_ag_news(tmp_path, 300))
    assert len(data.test) == 1200 and len(data.validation) == 240  # 10%, at most 1,000
    assert len(data.train) == 2400 - 240
    assert data.spec.labels == ("world", "sports", "business", "science")
    ex = data.test[0]
    assert ex.label == 0 and ex.target == "world"
    assert 'Title 0 \'s Story 0 costs $5 and "more "' in ex.input
    assert Counter(e.label for e in data.validation) == {0: 60, 1: 60, 2: 60, 3: 60}


def test_ag_news_only_test_csv_is_carved(tmp_path):
    data = load_task("ag_news", data_dir=_ag_news(tmp_path, 1900, with_train=False))
    assert (len(data.train), len(data.validation), len(data.test)) == (5200, 500, 1900)
    inputs = [set(e.input for e in s) for s in (data.train, data.validation, data.test)]
    assert not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])
    assert any("train.csv is absent" in note for note in data.notes)


def test_ag_news_bad_rows(tmp_path):
    root = _ag_news(tmp_path, 10)
    test_csv = root / "ag_news_csv" / "test.csv"
    lines = test_csv.read_text().splitlines()
    test_csv.write_text("\n".join([*lines[:4], '"7","T","D"', *lines[4:]]) + "\n")
    with pytest.raises(
        DataError, match=r"test.csv:5: class index \(column 1\) is '7'; expected 1-4"
    ):
        load_task("ag_news", data_dir=root)
    test_csv.write_text("\n".join([*lines[:2], '"1","T"', *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"test.csv:3: expected 3 comma-separated columns"):
        load_task("ag_news", data_dir=root)
    test_csv.write_bytes(b'"1","caf\xe9","x"\n')
    with pytest.raises(DataError, match=r"test.csv:1: not valid UTF-8"):
        load_task("ag_news", data_dir=root)


# ----------------------------------------------------------------------------- SAMSum


def _samsum(folder: Path, n: int, empty: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "val.json", "test.json"):
        items = [
            {
                "id": f"{name}-{i}",
                "summary": f"A tells B about {i}.",
                "dialogue": f"A: Guess what, {i}!\r\nB: Really?",
            }
            for i in range(n)
        ]
        items += [{"id": f"e{i}", "summary": "x", "dialogue": ""} for i in range(empty)]
        (folder / name).write_text(json.dumps(items, indent=2))


def test_samsum_reads_json_and_skips_empty(tmp_path):
    _samsum(tmp_path / "samsum", 20, empty=1)
    data = load_task("samsum", data_dir=tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (20, 20, 20)
    ex = data.train[3]
    assert ex.input == "Summarize this dialogue.\nA: Guess what, 3!\nB: Really?\nSummary:"
    assert ex.target == "A tells B about 3." and ex.group == "train.json-3"
    assert any("skipped 1 record(s) with an empty dialogue or summary" in n for n in data.notes)


def test_samsum_from_zip_and_bad_records(tmp_path):
    _samsum(tmp_path / "src" / "samsum", 5)
    archive = tmp_path / "data" / "samsum.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (tmp_path / "src").rglob("*.json"):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    assert len(load_task("samsum", data_dir=tmp_path / "data").test) == 5
    shutil.rmtree(tmp_path / "data")
    bad = tmp_path / "src" / "samsum" / "val.json"
    bad.write_text(
        '[\n  {"id": "1", "summary": "s", "dialogue": "d"},\n  {"id": "2", "summary": "s"}\n]'
    )
    with pytest.raises(
        DataError, match=r"val.json:3: record has no key 'dialogue'; keys present: id, summary"
    ):
        load_task("samsum", data_dir=tmp_path / "src")
    bad.write_text('[\n  {"id": "1", "summary": "s", "dialogue": "d"},\n  {"id": "2" "x"}\n]')
    with pytest.raises(DataError, match=r"val.json:3: invalid JSON"):
        load_task("samsum", data_dir=tmp_path / "src")


# --------------------------------------------------------------------------- the Hub


def test_without_data_dir_or_datasets_the_error_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as err:
        load_task("cola")
    text = str(err.value)
    assert "task 'cola' needs --data-dir DIR with the upstream release files" in text
    assert "in_domain_train.tsv" in text and "`datasets` is not installed" in text


def test_unknown_task_suggests_the_closest(tmp_path):
    with pytest.raises(UsageError, match=r"unknown task 'colaa'\. Did you mean 'cola'\?"):
        load_task("colaa")
    with pytest.raises(UsageError, match="task file not found"):
        load_task(str(tmp_path / "missing.yaml"))


def test_a_task_named_without_its_suffix_or_by_its_folder_says_which_file(tmp_path):
    (tmp_path / "num.yaml").write_text("type: classification\n")
    with pytest.raises(UsageError, match=r"Did you mean the task file .*num\.yaml\?$"):
        load_task(str(tmp_path / "num"))
    with pytest.raises(UsageError, match=r"It is a folder \(it holds num\.yaml\): give the "
                                         r"path of the task YAML itself\.$"):
        load_task(str(tmp_path))
    for folder in (".", "/"):  # no name to add a suffix to (it crashed)
        with pytest.raises(UsageError, match=rf"unknown task '{folder}'\. It is a folder"):
            load_task(folder)


def test_hub_rows_are_converted_like_the_release_files(monkeypatch):
    """The Hub path with a stand-in `datasets` module (the real Hub is unreachable here)."""
    rows = {
        "fancyzhx/ag_news": {
            "train": [{"text": f"Story {i} #39;s \\$1", "label": i % 4} for i in range(12_000)],
            "test": [{"text": "Markets rise", "label": 2}],
        },
        "nyu-mll/glue": {
            "train": [{"sentence": f"S {i}.", "label": i % 2, "idx": i} for i in range(600)],
            "validation": [{"sentence": "T.", "label": 1, "idx": 0}],
            "test": [{"sentence": "U.", "label": -1, "idx": 0}],
        },
        "tuetschek/e2e_nlg": {
            split: [
                {"meaning_representation": f"name[{i // 2}]", "human_reference": f"R {i}"}
                for i in range(6)
            ]
            for split in ("train", "validation", "test")
        },
        "Samsung/samsum": {
            split: [
                {"id": "1", "dialogue": "A: hi\r\nB: yo", "summary": "Greetings."},
                {"id": "2", "dialogue": "", "summary": "x"},
            ]
            for split in ("train", "validation", "test")
        },
    }
    fake = type(sys)("datasets")
    fake.__version__ = "0.fake"
    fake.load_dataset = lambda repo, config=None: rows[repo]
    monkeypatch.setitem(sys.modules, "datasets", fake)

    ag = load_task("ag_news")
    assert (len(ag.train), len(ag.validation), len(ag.test)) == (11_000, 1000, 1)
    assert "Story 0 's $1" in ag.train[0].input or "'s $1" in ag.validation[0].input
    assert ag.test[0].target == "business" and "fancyzhx/ag_news" in ag.source
    cola = load_task("cola")
    assert (len(cola.train), len(cola.validation), len(cola.test)) == (100, 500, 1)
    e2e = load_task("e2e_nlg")
    assert len(e2e.train) == 6 and len(e2e.test) == 3 and e2e.test[0].references == ("R 0", "R 1")
    sam = load_task("samsum")
    assert len(sam.train) == 1 and sam.train[0].input.endswith("A: hi\nB: yo\nSummary:")
    assert any("skipped 1 record(s)" in note for note in sam.notes)

    def unreachable(repo, config=None):
        raise ConnectionError("no route to huggingface.co")

    fake.load_dataset = unreachable
    with pytest.raises(DataError, match="because the Hugging Face Hub is unreachable"):
        load_task("e2e_nlg")
