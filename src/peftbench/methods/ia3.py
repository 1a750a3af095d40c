"""(IA)3 (Liu et al., 2022) via peft: learned rescaling of keys, values and FFN activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peft import IA3Config
from torch import nn

from peftbench.errors import UsageError
from peftbench.methods import peft_common
from peftbench.methods.base import Method
from peftbench.methods.registry import register
from peftbench.text import subject


def _default_targets(model: nn.Module) -> list[str] | None:
    """peft's (IA)3 target modules for this model's architecture, if it has a default."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)


@register
class IA3(Method):
    name = "ia3"
    description = "(IA)3: trains vectors that rescale keys, values and FFN activations (peft)."
    default_lr = 3e-3
    defaults: ClassVar[dict[str, Any]] = {"target_modules": None, "feedforward_modules": None}
    arg_help: ClassVar[dict[str, str]] = {
        "target_modules": "modules to rescale; default: peft's per-architecture choice "
        "(k, v, ffn out)",
        "feedforward_modules": "which of target_modules are feed-forward (scaled on the input)",
    }

    def resolve_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        args = super().resolve_args(overrides)
        for key in ("target_modules", "feedforward_modules"):
            args[key] = peft_common.module_names(args[key])
        return args

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        for key in ("target_modules", "feedforward_modules"):  # a misspelling first
            peft_common.require_modules(model, args[key], self.name, key)
        feedforward = args["feedforward_modules"]
        targets = args["target_modules"] or _default_targets(model)
        if isinstance(targets, list) and isinstance(feedforward, list):
            outside = [name for name in feedforward if name not in targets]
            if outside:
                which = ("target_modules=" if args["target_modules"] else
                         "the modules (IA)3 rescales by default in this model, ")
                raise UsageError(
                    f"--method-arg feedforward_modules={feedforward} (method 'ia3'): "
                    f"{subject(outside, 'is', 'are')} not in {which}{targets}; the "
                    f"feed-forward modules are some of the modules rescaled, e.g. "
                    f"target_modules={','.join([*targets, *outside])}")
        return peft_common.wrap(
            model, IA3Config, self.name,
            task_type=peft_common.task_type(encoder_decoder),
            target_modules=args["target_modules"],
            feedforward_modules=args["feedforward_modules"],
        )

    def save(self, model: nn.Module, out_dir: Path) -> None:
        peft_common.save_adapter(model, out_dir)

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        return peft_common.load_adapter(base, out_dir)
