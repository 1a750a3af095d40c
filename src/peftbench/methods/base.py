"""The Method interface: turn a base model into a trainable model, save and reload it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from peftbench.errors import UsageError


class Method(ABC):
    """One fine-tuning method. Subclasses declare a name, a default LR and their arguments.

    ``defaults`` lists every accepted ``--method-arg`` with its default value; a user value
    must have a compatible type (``None`` defaults, and the keys in ``free_form``, accept a
    list or a string, ``"a,b"`` meaning ``[a, b]``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    default_lr: ClassVar[float]
    defaults: ClassVar[dict[str, Any]] = {}
    arg_help: ClassVar[dict[str, str]] = {}
    free_form: ClassVar[frozenset[str]] = frozenset()
    # allowed values: numbers within (low, high), either end None = open; texts one of
    bounds: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def resolve_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``overrides``; unknown keys and wrong types are errors."""
        args = dict(self.defaults)
        for key, value in overrides.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise UsageError(
                    f"--method-arg {key}={value!r}: method '{self.name}' has no argument "
                    f"'{key}'. Its arguments are: {known}."
                )
            if value is None:  # None: the default, as `peftbench methods` prints it
                continue
            default = None if key in self.free_form else self.defaults[key]
            args[key] = _coerce(self.name, key, value, default)
            _check_value(self, key, args[key])
        return args

    @abstractmethod
    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        """Return the model to train: parameters to train have ``requires_grad=True``."""

    def check_lengths(self, base: nn.Module, args: dict[str, Any], longest: int, *,  # noqa: B027
                      encoder_decoder: bool) -> None:  # an optional check: most need none
        """Raise a UsageError when sequences of ``longest`` tokens cannot be trained with
        ``args`` on the model ``base`` (called once the training data is tokenised)."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Save what training changed (adapter or tensors) so that :meth:`load` restores it."""

    @abstractmethod
    def load(
        self, base: nn.Module, out_dir: Path, args: dict[str, Any], *, encoder_decoder: bool
    ) -> nn.Module:
        """Rebuild the trained model from a fresh base model and what :meth:`save` wrote."""


def _check_value(method: Method, key: str, value: Any) -> None:
    """``value`` within the method's ``bounds`` / ``choices`` for ``key``."""
    where = f"--method-arg {key}={value!r} (method '{method.name}')"
    low, high = method.bounds.get(key, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f"from {low:g} to {high:g}" if low is not None and high is not None
                else f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise UsageError(f"{where}: must be {span}.")
    allowed = method.choices.get(key)
    if allowed is not None and value not in allowed:
        raise UsageError(f"{where}: choose one of {', '.join(allowed)}.")


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default`` (ints are accepted for floats)."""
    where = f"--method-arg {key}={value!r} (method '{method}')"
    if value is None:
        return value
    if default is None:  # free-form (e.g. module names): "a,b" means the list [a, b]
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str | int) and not isinstance(value, bool):
            return value
        if isinstance(value, list) and all(isinstance(v, str | int) and not isinstance(v, bool)
                                           for v in value):
            return value
        quote = ("; in YAML a value with ':' (a layer range such as -6:) must be quoted, "
                 "\"-6:\"" if isinstance(value, dict) else "")
        raise UsageError(f"{where}: expected a name, a number or a list of them, e.g. "
                         f"{key}=a,b{quote}.")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false.")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected an integer, e.g. {key}={default}.")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return float(value)
        raise UsageError(f"{where}: expected a number, e.g. {key}={default}.")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise UsageError(f"{where}: expected a string, e.g. {key}={default}.")
    if isinstance(default, list):
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise UsageError(f"{where}: expected a list, e.g. {key}=[a,b].")
    return value


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied/shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips shared duplicates
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def freeze(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter."""
    for param in model.parameters():
        param.requires_grad_(False)


def save_trainable(model: nn.Module, path: Path) -> list[str]:
    """Write the trainable tensors to ``path`` (safetensors); their names back."""
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path))
    return sorted(tensors)


def load_trainable(model: nn.Module, path: Path, method: str) -> nn.Module:
    """Load what :func:`save_trainable` wrote into ``model`` (built the same way)."""
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise UsageError(f"{method} tensors in {path} do not fit this model: "
                         f"{result.unexpected_keys[:5]}")
    return model
