"""The study's datasets from the Hugging Face Hub (``datasets``, imported lazily).

Used only when no ``--data-dir`` is given. Offline, or without the ``datasets`` package,
the error tells the user which upstream release files to put in a directory instead.
"""

from __future__ import annotations

from typing import Any

from peftbench.errors import DataError

HUB_IDS: dict[str, tuple[str, str | None]] = {
    "ag_news": ("fancyzhx/ag_news", None),
    "cola": ("nyu-mll/glue", "cola"),
    "e2e_nlg": ("tuetschek/e2e_nlg", None),
    "samsum": ("Samsung/samsum", None),
}


def load_hub_rows(task: str, release_files: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``({split: rows}, source description)`` for one of :data:`HUB_IDS`."""
    repo, config = HUB_IDS[task]
    advice = f"task '{task}' needs --data-dir DIR with the upstream release files ({release_files})"
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{advice} because `datasets` is not installed (install it with "
            "`pip install 'peftbench[hub]'` to read the task from the Hugging Face Hub)"
        ) from exc
    try:
        loaded = datasets.load_dataset(repo, config)
        rows = {split: list(loaded[split]) for split in loaded}
    except Exception as exc:  # network, auth, script and cache errors all mean the same here
        raise DataError(
            f"{advice} because the Hugging Face Hub is unreachable or refused {repo} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    name = f"{repo} ({config})" if config else repo
    return rows, f"Hugging Face Hub: {name}, datasets {datasets.__version__}"
