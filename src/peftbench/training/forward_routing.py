"""Replacing a module's forward in place, keeping the original reachable: shared by the
fused LoRA layers and the recomputed SiLU gates."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn


def route_forwards(model: nn.Module, applies: Callable[[nn.Module], bool],
                   forward: Callable[..., Any], original: str) -> int:
    """Make ``forward`` the forward of every module of ``model`` that ``applies`` to, with
    the module's own forward kept as attribute ``original``; returns how many modules apply
    (idempotent: a module already routed is counted, not wrapped again)."""
    routed = 0
    for module in model.modules():
        if not applies(module):
            continue
        if not hasattr(module, original):
            setattr(module, original, module.forward)
            module.forward = types.MethodType(forward, module)
        routed += 1
    return routed
