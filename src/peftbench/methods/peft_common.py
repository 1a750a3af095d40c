"""Shared save/load for methods implemented by the peft library."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from peftbench.errors import UsageError


def task_type(encoder_decoder: bool) -> TaskType:
    return TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM


@contextmanager
def _no_peft_deprecation_warning() -> Iterator[None]:
    """peft reads ``is_gradient_checkpointing``, a property transformers 5 deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def build_config(config_class: type[PeftConfig], method: str, **kwargs: Any) -> PeftConfig:
    """``config_class(**kwargs)`` with peft's validation errors turned into a UsageError."""
    try:
        return config_class(**kwargs)
    except ValueError as exc:  # e.g. arguments peft does not combine
        raise UsageError(f"method '{method}': peft rejected the configuration: {exc}") from None


def wrap(model: nn.Module, config: PeftConfig, method: str) -> nn.Module:
    """``get_peft_model`` with configuration mistakes turned into a clear UsageError."""
    try:
        with _no_peft_deprecation_warning():
            return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that match nothing
        raise UsageError(f"method '{method}': peft rejected the configuration: {exc}") from None


def save_adapter(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir))


def load_adapter(base: nn.Module, out_dir: Path, **_: Any) -> nn.Module:
    with _no_peft_deprecation_warning():
        return PeftModel.from_pretrained(base, str(out_dir))
