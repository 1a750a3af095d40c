"""Shared save/load for methods implemented by the peft library."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from peftbench.errors import UsageError
from peftbench.text import subject


def module_names(value: Any) -> Any:
    """``target_modules`` as peft should read it: one plain module name becomes a list
    (peft reads a string as a regular expression that must match the *whole* dotted name,
    so ``q_proj`` alone would match nothing); lists, ``all-linear`` and patterns stay."""
    if isinstance(value, str) and value != "all-linear" \
            and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return [value]
    return value


def require_modules(model: nn.Module, names: Any, method: str, key: str) -> None:
    """Every name of a ``target_modules`` list names a module of ``model`` (as peft matches
    them: the whole dotted name or its last parts). peft only refuses a list that matches
    nothing, so a misspelled name beside a right one was silently ignored."""
    if not isinstance(names, list):
        return
    dotted = [name for name, _ in model.named_modules() if name]
    missing = [n for n in names if not any(d == n or d.endswith(f".{n}") for d in dotted)]
    if missing:
        from transformers.pytorch_utils import Conv1D

        linear = sorted({d.rsplit(".", 1)[-1] for d, m in model.named_modules()
                         if isinstance(m, nn.Linear | Conv1D)})
        raise UsageError(f"--method-arg {key}={names} (method '{method}'): "
                         f"{subject(missing, 'names', 'name')} no module of this model; its "
                         f"linear layers are called {', '.join(linear)}")


def task_type(encoder_decoder: bool) -> TaskType:
    return TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM


@contextmanager
def _no_peft_deprecation_warning() -> Iterator[None]:
    """peft reads ``is_gradient_checkpointing``, a property transformers 5 deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def wrap(model: nn.Module, config_class: type[PeftConfig], method: str,
         **config: Any) -> nn.Module:
    """``get_peft_model(model, config_class(**config))`` with configuration mistakes (peft's
    validation, target modules that match nothing) turned into a clear UsageError; every
    name in a module list must name a module (peft ignores a wrong one beside right ones)."""
    for key in ("target_modules", "feedforward_modules"):
        require_modules(model, config.get(key), method, key)
    try:
        with _no_peft_deprecation_warning():
            return get_peft_model(model, config_class(**config))
    except ValueError as exc:
        raise UsageError(f"method '{method}': peft rejected the configuration: {exc}") from None


def save_adapter(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir))


def load_adapter(base: nn.Module, out_dir: Path, **_: Any) -> nn.Module:
    with _no_peft_deprecation_warning():
        return PeftModel.from_pretrained(base, str(out_dir))
