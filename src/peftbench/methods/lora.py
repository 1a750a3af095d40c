"""LoRA (Hu et al., 2021) via peft: low-rank updates to selected linear layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peft import LoraConfig
from torch import nn

from peftbench.errors import UsageError
from peftbench.methods import peft_common
from peftbench.methods.base import Method
from peftbench.methods.layers import (
    is_relative,
    layer_count,
    parse_layers,
    resolve_layers,
    stack_depths,
)
from peftbench.methods.registry import register

ALL_LINEAR = "all-linear"


@register
class LoRA(Method):
    name = "lora"
    description = ("LoRA: trains low-rank updates B@A added to every linear layer of the body "
                   "(peft 'all-linear'; the study adapted q and v only).")
    default_lr = 1e-3
    defaults: ClassVar[dict[str, Any]] = {
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        # all linear layers: on CoLA (SmolLM2-135M, 1,000 examples, 3 epochs) q/v-only LoRA
        # reached validation MCC 6.9, all-linear 15.3 (test 6.5 vs 15.2)
        "target_modules": ALL_LINEAR,
        "layers_to_transform": None,
    }
    free_form: ClassVar[frozenset[str]] = frozenset({"target_modules", "layers_to_transform"})
    arg_help: ClassVar[dict[str, str]] = {
        "r": "rank of the update",
        "alpha": "scaling numerator (update scaled by alpha / r)",
        "dropout": "dropout on the LoRA input",
        "target_modules": ("module names to adapt (e.g. q_proj,v_proj as in the study); "
                           "default all-linear: every linear layer except the output head"),
        "layers_to_transform": ("layers to adapt: indices (e.g. [20,21,22]; 0 = the first, "
                                "-1 = the last) or a range (-6: = the last six); default: "
                                "all. Encoder-decoder models: that block of the encoder and "
                                "of the decoder"),
    }

    bounds: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "r": (1, None), "alpha": (0.0, None), "dropout": (0.0, 1.0)}

    def resolve_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        args = super().resolve_args(overrides)
        args["target_modules"] = peft_common.module_names(args["target_modules"])
        args["layers_to_transform"] = parse_layers(args["layers_to_transform"], self.name,
                                                   "layers_to_transform")
        return args

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        selection = args["layers_to_transform"]
        depths = stack_depths(model)
        if is_relative(selection) and len(set(depths.values())) > 1:
            raise UsageError(f"--method-arg layers_to_transform={selection} (method 'lora'): "
                             "the layer stacks have different depths ("
                             + ", ".join(f"{k or 'model'} {v}" for k, v in depths.items())
                             + "), and peft applies one list of indices to all of them: give "
                             "indices counted from 0")
        layers = resolve_layers(selection, layer_count(model), self.name,
                                "layers_to_transform")
        return peft_common.wrap(
            model, LoraConfig, self.name,
            task_type=peft_common.task_type(encoder_decoder),
            r=args["r"],
            lora_alpha=args["alpha"],
            lora_dropout=args["dropout"],
            target_modules=_targets(model, args["target_modules"], layers),
            layers_to_transform=layers,
        )

    def save(self, model: nn.Module, out_dir: Path) -> None:
        peft_common.save_adapter(model, out_dir)

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        return peft_common.load_adapter(base, out_dir)


def _targets(model: nn.Module, target_modules: Any, layers: Any) -> Any:
    """``target_modules`` for peft. peft refuses ``all-linear`` together with
    ``layers_to_transform``; then it becomes the short names of the body's linear layers
    (``nn.Linear`` and transformers' ``Conv1D``, the output head left out, as in peft's
    all-linear). Short names, because peft applies the layer selection only to those."""
    if layers is None or not (isinstance(target_modules, str)
                              and target_modules.lower() == ALL_LINEAR):
        return target_modules
    from transformers.pytorch_utils import Conv1D

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear | Conv1D) and module is not head})
