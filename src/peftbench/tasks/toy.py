"""Two small generated tasks for tests and smoke runs: no files, learnable in minutes.

``toy_cls``: short sentences whose sentiment word comes from one of two word lists.
``toy_gen``: ``reverse:``/``copy:`` of 3-5 words from a 12-word vocabulary.
The data is generated with a fixed seed (2,000 train, 64 validation, 64 test, all distinct
inputs), so every run sees the same splits; the run seed only draws ``train_size`` subsets.
"""

from __future__ import annotations

import random

from peftbench.tasks.base import Example, TaskData, TaskSpec
from peftbench.tasks.fingerprints import content_fingerprint

TOY_CLS = TaskSpec(
    name="toy_cls",
    type="classification",
    template="Is this sentence positive or negative?\n{text}\nSentiment:",
    primary_metric="accuracy",
    labels=("negative", "positive"),
    description="Generated: short sentences labelled by which word list their adjectives "
    "come from.",
)
TOY_GEN = TaskSpec(
    name="toy_gen",
    type="generation",
    template="{op}: {words}\nOutput:",
    primary_metric="rougeL",
    description="Generated: reverse or copy a list of 3-5 words.",
)

SIZES = {"train": 2000, "validation": 64, "test": 64}
_SEED = "peftbench-toy-v1"
_SUBJECTS = (
    "the movie",
    "the food",
    "the service",
    "the weather",
    "the book",
    "the trip",
    "the game",
    "the song",
)
_ADVERBS = ("really", "quite", "very", "so", "rather", "truly")
_POSITIVE = ("good", "great", "happy", "excellent", "lovely", "nice", "bright", "wonderful")
_NEGATIVE = ("bad", "awful", "sad", "terrible", "poor", "ugly", "dull", "boring")
_VOCAB = (
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "fish",
    "bird",
    "car",
    "book",
)


def _cls_example(rng: random.Random) -> Example:
    label = rng.randrange(2)
    words = _POSITIVE if label else _NEGATIVE
    text = f"{rng.choice(_SUBJECTS)} was {rng.choice(_ADVERBS)} {rng.choice(words)}"
    if rng.random() < 0.5:
        text += f" and {rng.choice(words)}"
    return Example(TOY_CLS.template.format(text=text), TOY_CLS.labels[label], label=label)


def _gen_example(rng: random.Random) -> Example:
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(3, 5))]
    op = rng.choice(("reverse", "copy"))
    target = " ".join(reversed(words) if op == "reverse" else words)
    return Example(TOY_GEN.template.format(op=op, words=" ".join(words)), target)


def load_toy(name: str) -> TaskData:
    """Generate ``toy_cls`` or ``toy_gen`` (always the same data)."""
    spec, make = (TOY_CLS, _cls_example) if name == "toy_cls" else (TOY_GEN, _gen_example)
    rng = random.Random(f"{_SEED}:{name}")
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in SIZES.items():
        examples: list[Example] = []
        while len(examples) < size:
            ex = make(rng)
            if ex.input not in seen:  # no input appears twice, within or across splits
                seen.add(ex.input)
                examples.append(ex)
        splits[split] = examples
    return TaskData(
        spec,
        splits["train"],
        splits["validation"],
        splits["test"],
        fingerprint=content_fingerprint(splits),
        source=f"generated (seed '{_SEED}:{name}')",
        notes=[
            f"generated splits: {SIZES['train']} train / {SIZES['validation']} validation / "
            f"{SIZES['test']} test, distinct inputs"
        ],
    )
