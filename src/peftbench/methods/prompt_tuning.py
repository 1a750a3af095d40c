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

    def check_lengths(self, base: nn.Module, args: dict[str, Any], longest: int, *,
                      encoder_decoder: bool) -> None:
        """The soft prompt and the longest tokenised training sequence fit the decoder's
        positions (past them, learned positions fail and rotary ones were never trained)."""
        positions = _positions(base)
        virtual_tokens = args["num_virtual_tokens"]
        if not encoder_decoder and positions is not None \
                and virtual_tokens + longest > positions:
            raise _room_error(virtual_tokens, positions,
                              f"the longest training sequence ({longest} tokens)",
                              positions - longest)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        peft_common.save_adapter(model, out_dir)

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        return peft_common.load_adapter(base, out_dir)


def _positions(model: nn.Module) -> int | None:
    """The positions a decoder was built for (``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def _room_error(virtual_tokens: int, positions: int, why: str, at_most: int) -> UsageError:
    return UsageError(
        f"--method-arg num_virtual_tokens={virtual_tokens} (method 'prompt_tuning'): the model "
        f"has {positions} positions (max_position_embeddings), which the soft prompt and "
        f"{why} share; use at most {max(at_most, 0)} virtual tokens (the default is 20).")


def _check_positions(model: nn.Module, virtual_tokens: int) -> None:
    """A decoder reads the soft prompt and the input as one sequence: a prompt that fills
    the positions leaves none for the input."""
    positions = _positions(model)
    if positions is not None and virtual_tokens >= positions:
        raise _room_error(virtual_tokens, positions, "the input", positions - 1)
