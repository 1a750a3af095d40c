"""Methods registered by name."""

from __future__ import annotations

from peftbench.errors import UsageError, did_you_mean
from peftbench.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    """An instance of the method called ``name``; a clear error for unknown names."""
    _load_builtin()
    if name not in _REGISTRY:
        hint = did_you_mean(name, list(_REGISTRY))
        raise UsageError(f"unknown method '{name}' (--method).{hint}")
    return _REGISTRY[name]()


def list_methods() -> list[Method]:
    """All registered methods, in a stable order."""
    _load_builtin()
    return [cls() for _, cls in sorted(_REGISTRY.items())]


def _load_builtin() -> None:
    from peftbench.methods import (  # noqa: F401
        bitfit,
        full,
        ia3,
        lora,
        partial,
        prompt_tuning,
    )
