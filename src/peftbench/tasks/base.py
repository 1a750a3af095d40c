"""The task data model: a declarative spec, examples, and a loaded, split dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskType = Literal["classification", "generation"]


@dataclass(frozen=True)
class TaskSpec:
    """How a dataset becomes a text-to-text task.

    ``template`` is a ``str.format`` pattern over the raw record's fields that yields the
    model input; ``labels`` are the verbalizers (classification), in label-index order.
    """

    name: str
    type: TaskType
    template: str
    primary_metric: str  # accuracy | mcc | macro_f1 | rougeL | rougeLsum | bleu ...
    labels: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Example:
    """One model input and its target text.

    Classification: ``target`` is the verbalizer of ``label``. Generation: ``references``
    holds every acceptable output (multi-reference scoring); ``target`` is the one trained on.
    ``group`` keeps related rows (same MR, movie, article) in the same split.
    """

    input: str
    target: str
    label: int | None = None
    references: tuple[str, ...] = ()
    group: str | None = None

    @property
    def refs(self) -> tuple[str, ...]:
        return self.references or (self.target,)


@dataclass
class TaskData:
    """A task with its three splits, ready to train on.

    ``fingerprint`` is a sha256 over the source files (or generated content); ``notes``
    records how any missing split was carved and how the train subset was drawn.
    """

    spec: TaskSpec
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    fingerprint: str
    source: str
    notes: list[str] = field(default_factory=list)
