"""Prompt tuning (Lester et al., 2021) via peft: trainable soft-prompt vectors before the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peft import PromptTuningConfig, PromptTuningInit
from torch import nn

from peftbench.errors import UsageError
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
        if not encoder_decoder:
            _check_positions(model, args["num_virtual_tokens"])
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


def _check_positions(model: nn.Module, virtual_tokens: int) -> None:
    """A decoder reads the soft prompt and the input in one sequence of at most the model's
    positions; a prompt that fills them leaves no room for the input (and long before that,
    attention over it runs out of memory)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    if isinstance(positions, int) and virtual_tokens > positions // 2:
        raise UsageError(
            f"--method-arg num_virtual_tokens={virtual_tokens} (method 'prompt_tuning'): the "
            f"model reads at most {positions} positions, which the soft prompt and the input "
            f"share; use at most {positions // 2} virtual tokens (the study's prompts use 20)."
        )
