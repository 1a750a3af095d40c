"""Any Hugging Face checkpoint: a local directory, or a Hub id (local cache first).

The family comes from ``AutoConfig``: ``config.is_encoder_decoder`` selects
``AutoModelForSeq2SeqLM``, otherwise ``AutoModelForCausalLM``. The Hub is tried only when
the model is not already in the local Hugging Face cache, offline mode is off and a short
connection probe succeeds, so an unreachable Hub fails in seconds, not after retries.
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftbench.errors import UsageError
from peftbench.models.base import LoadedModel
from peftbench.models.fingerprint import dir_fingerprint
from peftbench.models.quiet import no_weight_progress
from peftbench.models.setup import prepare

PROBE_TIMEOUT_S = 3.0
_LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)  # the last: a damaged file


def looks_like_path(name: str) -> bool:
    """True for names that can only be a path (a Hub id is ``name`` or ``owner/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """Offline mode as set now (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    env = any(str(v).strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags if v)
    return env or bool(constants.HF_HUB_OFFLINE)


@lru_cache(maxsize=4)
def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds.

    With an HTTP(S) proxy configured the probe cannot tell, so it answers True.
    """
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load(source: str, *, local_files_only: bool) -> tuple[Any, Any, Any]:
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    quiet = no_weight_progress() if Path(source).is_dir() else nullcontext()
    with quiet:  # a local folder loads in a second; downloads keep their progress bars
        model = auto.from_pretrained(source, config=config, dtype=torch.float32,
                                     local_files_only=local_files_only, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    return config, model, tokenizer


def _loaded(name: str, model: Any, tokenizer: Any, folder: Path, source: str) -> LoadedModel:
    prepare(model, tokenizer, name)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
        pretrained=True,
        fingerprint=dir_fingerprint(folder),
        source=source,
    )


def check_local_dir(folder: Path) -> None:
    """Raise :class:`UsageError` unless ``folder`` looks like a ``save_pretrained`` folder."""
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"model directory '{folder}' has no config.json; point to a directory written "
            "by save_pretrained (config.json, weights, tokenizer files)."
        )


def load_local_dir(name: str, folder: Path) -> LoadedModel:
    """Load a ``save_pretrained`` directory (model + tokenizer)."""
    check_local_dir(folder)
    try:
        _, model, tokenizer = _load(str(folder), local_files_only=True)
    except _LOAD_ERRORS as exc:
        raise UsageError(
            f"could not load model from directory '{folder}': {exc}. It must hold a "
            "sequence-to-sequence or causal language model and its tokenizer."
        ) from exc
    return _loaded(name, model, tokenizer, folder, f"local directory {folder.resolve()}")


def cached_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache folder holding ``name``'s config, if any (no network)."""
    from transformers.utils import cached_file

    try:
        found = cached_file(name, "config.json", local_files_only=True)
    except _LOAD_ERRORS:
        return None
    return Path(found).parent if found else None


def load_hub(name: str, unknown: Any) -> LoadedModel:
    """Load a Hub id from the local HF cache, else from the Hub if it is reachable.

    A cached model is loaded from its snapshot folder, as a local directory: loading by id
    with ``local_files_only=True`` still asks the Hub for ``adapter_config.json`` (with
    retries, ~20 s offline) in transformers 5.x when peft is installed.
    ``unknown(reason, exc)`` builds the :class:`UsageError` raised when neither works.
    """
    snapshot = cached_snapshot(name)
    error: Exception = FileNotFoundError(f"'{name}' is not in the local Hugging Face cache")
    if snapshot is not None:
        try:
            _, model, tokenizer = _load(str(snapshot), local_files_only=True)
        except _LOAD_ERRORS as exc:
            error = exc
        else:
            model.config.name_or_path = name
            return _loaded(name, model, tokenizer, snapshot,
                           f"Hugging Face Hub (local cache): {name} (revision {snapshot.name})")
    _require_hub(unknown, error)
    try:
        _, model, tokenizer = _load(name, local_files_only=False)
    except _LOAD_ERRORS as exc:
        raise unknown("the Hub has no such model or refused it", exc) from exc
    snapshot = cached_snapshot(name)
    if snapshot is None:
        raise unknown("it downloaded but is not in the local Hugging Face cache afterwards",
                      FileNotFoundError(name))
    return _loaded(name, model, tokenizer, snapshot,
                   f"Hugging Face Hub: {name} (revision {snapshot.name})")


def _require_hub(unknown: Any, error: Exception) -> None:
    """Raise ``unknown(reason, error)`` when the Hub cannot be asked (offline, unreachable)."""
    if hub_offline():
        raise unknown("offline mode is on (HF_HUB_OFFLINE) and it is not in the local "
                      "Hugging Face cache", error) from error
    if not hub_reachable():
        raise unknown("the Hub is unreachable and it is not in the local Hugging Face cache",
                      error) from error


def check_hub(name: str, unknown: Any) -> None:
    """Raise ``unknown(reason, exc)`` unless Hub id ``name`` is in the local cache with its
    weights or the reachable Hub has it (only its config is fetched: a check before a
    sweep)."""
    snapshot = cached_snapshot(name)
    if snapshot is not None and _has_weights(snapshot):
        return
    _require_hub(unknown, FileNotFoundError(f"'{name}' is not in the local Hugging Face cache"))
    try:
        AutoConfig.from_pretrained(name)
    except _LOAD_ERRORS as exc:
        raise unknown("the Hub has no such model or refused it", exc) from exc


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _has_weights(snapshot: Path) -> bool:
    """Whether a cached snapshot holds weights (a config alone is cached by a check)."""
    return any((snapshot / name).is_file() for name in WEIGHT_FILES)
