"""Full fine-tuning: every weight is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_model, save_model
from torch import nn

from peftbench.methods.base import Method
from peftbench.methods.registry import register


@register
class FullFineTuning(Method):
    name = "full"
    description = "Full fine-tuning: all weights trained (the baseline PEFT is measured against)."
    default_lr = 5e-5
    defaults: ClassVar[dict[str, Any]] = {}

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_model(model, str(out_dir / "model.safetensors"))  # handles tied weights

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        load_model(base, str(out_dir / "model.safetensors"))
        return base
