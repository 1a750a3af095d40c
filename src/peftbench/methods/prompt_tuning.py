"""Prompt tuning (Lester et al., 2021) via peft: trainable soft-prompt vectors before the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peft import PromptTuningConfig, PromptTuningInit
from torch import nn

from peftbench.methods import peft_common
from peftbench.methods.base import Method
from peftbench.methods.registry import register

_INITS = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}


@register
class PromptTuning(Method):
    name = "prompt_tuning"
    description = "Prompt tuning: trains virtual-token embeddings prepended to the input (peft)."
    default_lr = 3e-2
    defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 20, "init": "sample_vocab"}
    arg_help: ClassVar[dict[str, str]] = {
        "num_virtual_tokens": "number of soft-prompt vectors",
        "init": "sample_vocab (copies of random vocabulary embeddings) or random",
    }

    bounds: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "num_virtual_tokens": (1, None)}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"init": tuple(_INITS)}

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        return peft_common.wrap(
            model, PromptTuningConfig, self.name,
            task_type=peft_common.task_type(encoder_decoder),
            num_virtual_tokens=args["num_virtual_tokens"],
            prompt_tuning_init=_INITS[args["init"]],
            # the soft prompt goes before the encoder input only (Lester et al.), so no
            # unused decoder-side vectors are created and counted
            num_transformer_submodules=1,
        )

    def save(self, model: nn.Module, out_dir: Path) -> None:
        peft_common.save_adapter(model, out_dir)

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        return peft_common.load_adapter(base, out_dir)
