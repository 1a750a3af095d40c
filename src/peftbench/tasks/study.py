"""The reference study's four tasks: AG News, CoLA, E2E NLG and SAMSum.

Each reads the upstream release files from ``--data-dir`` (any subfolder, or a zip there)
or, without it, the Hugging Face Hub. Splits the release lacks are carved with a fixed
seed; ``TaskData.notes`` say how.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftbench.errors import DataError
from peftbench.tasks.base import Example, TaskData, TaskSpec
from peftbench.tasks.fingerprints import content_fingerprint, files_fingerprint
from peftbench.tasks.hub import load_hub_rows
from peftbench.tasks.local_files import SourceFile, find_release
from peftbench.tasks.readers import decode_text, iter_csv, iter_json_array
from peftbench.tasks.splits import carve, carve_note

AG_NEWS = TaskSpec(
    name="ag_news",
    type="classification",
    template="What is the topic of this news article: world, sports, business or science?\n"
    "{text}\nTopic:",
    primary_metric="accuracy",
    labels=("world", "sports", "business", "science"),
    description="AG News (Zhang et al. 2015): news title + description -> one of 4 topics.",
)
COLA = TaskSpec(
    name="cola",
    type="classification",
    template="Is the following sentence grammatically acceptable or unacceptable?\n"
    "{sentence}\nAnswer:",
    primary_metric="mcc",
    labels=("unacceptable", "acceptable"),
    description="CoLA (Warstadt et al. 2019): is an English sentence grammatical? "
    "Scored by Matthews correlation.",
)
E2E_NLG = TaskSpec(
    name="e2e_nlg",
    type="generation",
    template="Describe the restaurant from its attributes: {mr}\nDescription:",
    primary_metric="rougeL",
    description="E2E NLG (Novikova et al. 2017): restaurant meaning representation -> "
    "text, scored against all references of the MR.",
)
SAMSUM = TaskSpec(
    name="samsum",
    type="generation",
    template="Summarize this dialogue.\n{dialogue}\nSummary:",
    primary_metric="rougeL",
    description="SAMSum (Gliwa et al. 2019): messenger-style dialogue -> abstractive summary.",
)

_RELEASES = {  # task -> (required files, optional files, preferred folder names, hint)
    "ag_news": (
        ("test.csv",),
        ("train.csv", "classes.txt"),
        ("ag_news_csv",),
        "Unpack ag_news_csv.tar.gz (train.csv, test.csv, classes.txt) there.",
    ),
    "cola": (
        ("in_domain_train.tsv", "in_domain_dev.tsv"),
        ("out_of_domain_dev.tsv",),
        ("raw",),
        "Unpack cola_public_1.1.zip from https://nyu-mll.github.io/CoLA/ there.",
    ),
    "e2e_nlg": (
        ("trainset.csv", "devset.csv", "testset_w_refs.csv"),
        (),
        ("e2e-dataset",),
        "Clone github.com/tuetschek/e2e-dataset or unpack its release zip there.",
    ),
    "samsum": (
        ("train.json", "val.json", "test.json"),
        (),
        ("samsum",),
        "Unpack the SAMSum corpus (train.json, val.json, test.json) there.",
    ),
}


def _local(task: str, data_dir: Path) -> tuple[dict[str, SourceFile], dict[str, bytes], str]:
    required, optional, prefer, hint = _RELEASES[task]
    files = find_release(data_dir, task, required, optional, prefer=prefer, hint=hint)
    contents = {name: sf.read_bytes() for name, sf in files.items()}
    folder = files[required[0]].display.rsplit(required[0], 1)[0].rstrip("/\\")
    return files, contents, f"local files: {folder} ({', '.join(sorted(files))})"


def _hub(task: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    return load_hub_rows(task, ", ".join(_RELEASES[task][0]))


# ---------------------------------------------------------------------------- AG News

_BARE_ENTITY = re.compile(r"(?<!&)(#\d+;|\b(?:quot|amp|lt|gt|apos|nbsp);)")


def clean_ag_news(text: str) -> str:
    """Undo AG News escaping: ``#39;`` / ``quot;`` entities, ``\\$``, ``\\`` line breaks."""
    text = html.unescape(_BARE_ENTITY.sub(r"&\1", text))
    text = re.sub(r"\\(?=[^\w\s])", "", text)  # \$ -> $, \" -> "
    return " ".join(text.replace("\\", " ").split())  # a lone backslash stood for a newline


def _ag_example(label: int, text: str) -> Example:
    return Example(AG_NEWS.template.format(text=text), AG_NEWS.labels[label], label=label)


def _read_ag_news(sf: SourceFile, data: bytes) -> list[Example]:
    out = []
    for line, row in iter_csv(decode_text(data, sf.display), sf.display):
        where = f"{sf.display}:{line}"
        if len(row) != 3:
            raise DataError(
                f"{where}: expected 3 comma-separated columns (class index, title, "
                f"description), found {len(row)}"
            )
        if row[0].strip() not in ("1", "2", "3", "4"):
            raise DataError(
                f"{where}: class index (column 1) is {row[0]!r}; expected 1-4 "
                "(1 World, 2 Sports, 3 Business, 4 Sci/Tech)"
            )
        text = " ".join(t for t in (clean_ag_news(row[1]), clean_ag_news(row[2])) if t)
        if not text:
            raise DataError(f"{where}: title (column 2) and description (column 3) are empty")
        out.append(_ag_example(int(row[0]) - 1, text))
    return out


def load_ag_news(data_dir: Path | None) -> TaskData:
    """Validation: 1,000 carved from train (at most 10%); test: test.csv. Without train.csv,
    test.csv (7,600 rows) is split 25% test / 500 validation / the rest train."""
    notes = []
    val_source, val_cap = "train.csv", 1000
    if data_dir is None:
        rows, source = _hub("ag_news")
        train = [_ag_example(r["label"], clean_ag_news(r["text"])) for r in rows["train"]]
        test = [_ag_example(r["label"], clean_ag_news(r["text"])) for r in rows["test"]]
        fingerprint = content_fingerprint({"train": train, "test": test})
    else:
        files, contents, source = _local("ag_news", data_dir)
        fingerprint = files_fingerprint({k: v for k, v in contents.items() if k != "classes.txt"})
        test = _read_ag_news(files["test.csv"], contents["test.csv"])
        if "train.csv" in contents:
            train = _read_ag_news(files["train.csv"], contents["train.csv"])
        else:
            test, train = carve(test, round(0.25 * len(test)), "test", stratify=True)
            val_source, val_cap = "the rest of test.csv", 500
            notes.append(
                carve_note("test", len(test), "test.csv", "stratified by class")
                + "; train.csv is absent, so train, validation and test all come from the "
                "official test set and scores are not comparable to published ones"
            )
    n_val = max(1, min(val_cap, round(0.1 * len(train))))
    validation, train = carve(train, n_val, "validation", stratify=True)
    notes.insert(0, carve_note("validation", len(validation), val_source, "stratified by class"))
    return TaskData(AG_NEWS, train, validation, test, fingerprint, source, notes)


# ------------------------------------------------------------------------------- CoLA


def _cola_example(label: int, sentence: str) -> Example:
    return Example(COLA.template.format(sentence=sentence), COLA.labels[label], label=label)


def _read_cola(sf: SourceFile, data: bytes) -> list[Example]:
    out = []
    rows = iter_csv(decode_text(data, sf.display), sf.display, "\t", csv.QUOTE_NONE)
    for line, row in rows:
        where = f"{sf.display}:{line}"
        if len(row) != 4:
            raise DataError(
                f"{where}: expected 4 tab-separated columns (source, label, author's mark, "
                f"sentence), found {len(row)}"
            )
        if row[1].strip() not in ("0", "1"):
            raise DataError(
                f"{where}: label (column 2) is {row[1]!r}; expected 0 (unacceptable) "
                "or 1 (acceptable)"
            )
        if not row[3].strip():
            raise DataError(f"{where}: sentence (column 4) is empty")
        out.append(_cola_example(int(row[1]), row[3].strip()))
    return out


def load_cola(data_dir: Path | None) -> TaskData:
    notes = []
    if data_dir is None:
        rows, source = _hub("cola")
        train = [_cola_example(r["label"], r["sentence"].strip()) for r in rows["train"]]
        test = [_cola_example(r["label"], r["sentence"].strip()) for r in rows["validation"]]
        fingerprint = content_fingerprint({"train": train, "test": test})
        notes.append(
            "test: GLUE CoLA validation (in-domain + out-of-domain dev, "
            f"{len(test)} sentences); the official test labels are not public"
        )
    else:
        files, contents, source = _local("cola", data_dir)
        fingerprint = files_fingerprint(contents)
        train = _read_cola(files["in_domain_train.tsv"], contents["in_domain_train.tsv"])
        test = _read_cola(files["in_domain_dev.tsv"], contents["in_domain_dev.tsv"])
        if "out_of_domain_dev.tsv" in files:
            test += _read_cola(files["out_of_domain_dev.tsv"], contents["out_of_domain_dev.tsv"])
            notes.append(
                f"test: in_domain_dev.tsv + out_of_domain_dev.tsv ({len(test)} "
                "sentences) = GLUE CoLA validation; the official test is not public"
            )
        else:
            notes.append(
                f"test: in_domain_dev.tsv only ({len(test)} sentences; "
                "out_of_domain_dev.tsv is absent, so this is not all of GLUE "
                "CoLA validation); the official test is not public"
            )
    validation, train = carve(train, 500, "validation", stratify=True)
    notes.insert(0, carve_note("validation", len(validation), "in_domain_train.tsv",
                               "stratified by class"))
    return TaskData(COLA, train, validation, test, fingerprint, source, notes)


# --------------------------------------------------------------------------- E2E NLG


def _read_e2e(sf: SourceFile, data: bytes) -> list[tuple[str, str]]:
    rows = iter_csv(decode_text(data, sf.display), sf.display)
    first = next(rows, None)
    header = [h.strip().lower() for h in first[1]] if first else []
    if header != ["mr", "ref"]:
        raise DataError(f"{sf.display}:1: expected the header 'mr,ref', found {header}")
    pairs = []
    for line, row in rows:
        where = f"{sf.display}:{line}"
        if len(row) != 2:
            raise DataError(
                f"{where}: expected 2 comma-separated columns (mr, ref), found {len(row)}"
            )
        for column, value in zip(("mr", "ref"), row, strict=True):
            if not value.strip():
                raise DataError(f"{where}: column '{column}' is empty")
        pairs.append((row[0].strip(), row[1]))
    return pairs


def _e2e_examples(pairs: Iterable[tuple[str, str]], multi_reference: bool) -> list[Example]:
    """Train: one example per (MR, ref). Eval: one per MR with all its refs, in file order."""
    if not multi_reference:
        return [
            Example(E2E_NLG.template.format(mr=mr), " ".join(ref.split()), group=mr)
            for mr, ref in pairs
        ]
    refs: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(" ".join(ref.split()))
    return [
        Example(E2E_NLG.template.format(mr=mr), texts[0], references=tuple(texts), group=mr)
        for mr, texts in refs.items()
    ]


def load_e2e_nlg(data_dir: Path | None) -> TaskData:
    if data_dir is None:
        rows, source = _hub("e2e_nlg")
        pairs = {
            split: [
                (r["meaning_representation"].strip(), r["human_reference"]) for r in rows[split]
            ]
            for split in ("train", "validation", "test")
        }
        fingerprint = ""
    else:
        files, contents, source = _local("e2e_nlg", data_dir)
        pairs = {
            split: _read_e2e(files[name], contents[name])
            for split, name in (
                ("train", "trainset.csv"),
                ("validation", "devset.csv"),
                ("test", "testset_w_refs.csv"),
            )
        }
        fingerprint = files_fingerprint(contents)
    train = _e2e_examples(pairs["train"], multi_reference=False)
    validation = _e2e_examples(pairs["validation"], multi_reference=True)
    test = _e2e_examples(pairs["test"], multi_reference=True)
    splits = {"train": train, "validation": validation, "test": test}
    fingerprint = fingerprint or content_fingerprint(splits)
    notes = [
        f"train: one example per (MR, reference) row ({len(train)} rows, "
        f"{len({ex.group for ex in train})} MRs)",
        f"validation/test: one example per MR ({len(validation)} / {len(test)}) with all its "
        "references; the target is the first reference",
    ]
    return TaskData(E2E_NLG, train, validation, test, fingerprint, source, notes)


# ----------------------------------------------------------------------------- SAMSum


def _samsum_examples(
    items: Iterable[tuple[str, Any]], split: str, notes: list[str]
) -> list[Example]:
    out, skipped = [], 0
    for where, item in items:
        if not isinstance(item, dict):
            raise DataError(
                f"{where}: expected an object with dialogue and summary, "
                f"found {type(item).__name__}"
            )
        for key in ("dialogue", "summary"):
            if key not in item:
                raise DataError(
                    f"{where}: record has no key '{key}'; keys present: "
                    f"{', '.join(map(str, item)) or '(none)'}"
                )
        turns = [t.strip() for t in str(item["dialogue"] or "").splitlines() if t.strip()]
        summary = " ".join(str(item["summary"] or "").split())
        if not turns or not summary:
            skipped += 1
            continue
        dialogue = "\n".join(turns)
        group = str(item.get("id")) if item.get("id") is not None else None
        out.append(Example(SAMSUM.template.format(dialogue=dialogue), summary, group=group))
    if skipped:
        notes.append(f"{split}: skipped {skipped} record(s) with an empty dialogue or summary")
    return out


def load_samsum(data_dir: Path | None) -> TaskData:
    notes: list[str] = []
    names = {"train": "train.json", "validation": "val.json", "test": "test.json"}
    if data_dir is None:
        rows, source = _hub("samsum")
        items = {s: [(f"{s} row {i}", r) for i, r in enumerate(rows[s], 1)] for s in names}
        fingerprint = ""
    else:
        files, contents, source = _local("samsum", data_dir)
        fingerprint = files_fingerprint(contents)
        items = {}
        for split, name in names.items():
            display = files[name].display
            text = decode_text(contents[name], display)
            items[split] = [
                (f"{display}:{line}", item) for line, item in iter_json_array(text, display)
            ]
    splits = {s: _samsum_examples(items[s], s, notes) for s in names}
    fingerprint = fingerprint or content_fingerprint(splits)
    return TaskData(
        SAMSUM, splits["train"], splits["validation"], splits["test"], fingerprint, source, notes
    )
