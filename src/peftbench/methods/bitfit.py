"""BitFit (Ben Zaken et al., 2022): train only bias terms.

Architectures without biases (T5, Llama) get zero-initialised bias vectors on their linear
layers, so the model computes exactly what the base model computes at step 0; the added
biases are the trainable parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import UsageError
from peftbench.methods.base import Method, freeze, load_trainable, save_trainable
from peftbench.methods.registry import register
from peftbench.text import subject

_ADDED = "bitfit_added_biases.json"


def _within(name: str, part: object) -> bool:
    """``part`` (``mlp``, ``0``, ``layers.0``, ``mlp.down_proj``) is a whole part, or a run
    of whole parts, of the dotted module ``name``."""
    return f".{part}." in f".{name}."


def add_zero_biases(model: nn.Module, exclude: list[str]) -> list[str]:
    """Give every bias-free ``nn.Linear`` (not matching ``exclude``) a zero bias; names back."""
    added = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            if any(_within(name, part) for part in exclude):
                continue
            weight = module.weight
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=torch.float32,
                                                   device=weight.device))
            added.append(name)
    return added


def _require_parts(model: nn.Module, exclude: list[str]) -> None:
    """Every ``exclude`` entry is a part (or a dotted run of parts) of some module's name:
    a misspelled one would otherwise exclude nothing, silently."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [part for part in exclude if not any(_within(name, part) for name in names)]
    if missing:
        named = sorted({part for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) for part in name.split(".")
                        if not part.isdigit()})
        raise UsageError(f"--method-arg exclude={exclude} (method 'bitfit'): "
                         f"{subject(missing, 'names', 'name')} no module of this model; give "
                         f"parts of module paths such as {', '.join(named)}, a layer index, "
                         "or a dotted run of them (layers.0, mlp.down_proj)")


@register
class BitFit(Method):
    name = "bitfit"
    description = "BitFit: trains only bias terms (zero biases added where the model has none)."
    default_lr = 1e-3
    defaults: ClassVar[dict[str, Any]] = {"exclude": ["lm_head"]}
    arg_help: ClassVar[dict[str, str]] = {
        "exclude": "modules whose linear layers get no added bias: parts of module paths "
                   "(mlp, 0) or dotted runs of them (layers.0); default: lm_head",
    }

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        if args["exclude"] != self.defaults["exclude"]:  # the default fits models without one
            _require_parts(model, args["exclude"])
        freeze(model)
        add_zero_biases(model, args["exclude"])
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        if not biases:
            raise UsageError("method 'bitfit': the model has no bias terms and no linear layers "
                             "to add them to.")
        for param in biases:
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        names = save_trainable(model, out_dir / "bitfit.safetensors")
        (out_dir / _ADDED).write_text(json.dumps(names))

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        model = self.apply(base, args, encoder_decoder=encoder_decoder)
        return load_trainable(model, out_dir / "bitfit.safetensors", self.name)
