"""Partial fine-tuning: the weights of chosen layers and/or modules trained, the rest frozen.

The reference study's fourth finding: training only some parts of the model (later layers,
attention) can keep the score with far fewer trainable parameters. ``layers`` picks
transformer blocks (indices or a range, "-6:" = the last six; both stacks of an
encoder-decoder); ``modules`` picks parameters by name part (``self_attn``, ``mlp``,
``q_proj``, ``decoder``). Given both, a parameter must be in a chosen layer *and* match a
module name. A range or a negative index counts from the end of each stack (an
encoder-decoder with a 4-block encoder and a 2-block decoder: "-1:" = encoder block 3 and
decoder block 1). Frozen layers below the lowest chosen one compute no gradient at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftbench.errors import UsageError
from peftbench.methods.base import Method, freeze, load_trainable, save_trainable
from peftbench.methods.layers import layer_index, parse_layers, resolve_per_stack, stack_of
from peftbench.methods.registry import register
from peftbench.text import subject

_FILE = "partial.safetensors"


@register
class PartialFineTuning(Method):
    name = "partial"
    description = ("Partial fine-tuning: the weights of chosen layers and/or modules trained "
                   "(e.g. the last six layers, attention only), the rest frozen.")
    default_lr = 5e-5  # full fine-tuning's: the same weights, fewer of them
    defaults: ClassVar[dict[str, Any]] = {"layers": None, "modules": None}
    free_form: ClassVar[frozenset[str]] = frozenset({"layers", "modules"})
    arg_help: ClassVar[dict[str, str]] = {
        "layers": ("layers to train: indices (e.g. [20,21,22]; 0 = the first, -1 = the last) "
                   "or a range (-6: = the last six); default: every layer. Encoder-decoder "
                   "models: that block of the encoder and of the decoder"),
        "modules": ("train only parameters under these module names (e.g. self_attn; q_proj,"
                    "v_proj; mlp; decoder); default: every module of the chosen layers"),
    }

    def resolve_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        args = super().resolve_args(overrides)
        args["layers"] = parse_layers(args["layers"], self.name, "layers")
        modules = args["modules"]
        if isinstance(modules, str):
            modules = [modules]
        if modules is not None and (not modules or not all(isinstance(m, str) and m.strip()
                                                           for m in modules)):
            raise UsageError(f"--method-arg modules={args['modules']!r} (method 'partial'): "
                             "expected module names, e.g. modules=self_attn or "
                             "modules=q_proj,v_proj")
        args["modules"] = [m.strip().strip(".") for m in modules] if modules else None
        if args["layers"] is None and args["modules"] is None:
            raise UsageError("method 'partial' trains chosen parts: give --method-arg "
                             "layers=... (e.g. layers=-6:) and/or modules=... (e.g. "
                             "modules=self_attn); to train every weight use method 'full'")
        return args

    def apply(self, model: nn.Module, args: dict[str, Any], *, encoder_decoder: bool) -> nn.Module:
        layers = resolve_per_stack(args["layers"], model, self.name, "layers")
        modules = args["modules"]
        freeze(model)
        chosen = [param for name, param in model.named_parameters()
                  if _in_layers(name, layers) and _in_modules(name, modules)]
        if mistake := _selection_mistake(model, args, layers, bool(chosen)):
            raise UsageError(f"{mistake}. Module names in its layers: "
                             f"{', '.join(_module_names(model))}; outside them: "
                             f"{', '.join(n for n, _ in model.named_children())}"
                             f"{_tied_note(model)}")
        for param in chosen:
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_trainable(model, out_dir / _FILE)

    def load(self, base, out_dir, args, *, encoder_decoder):  # type: ignore[override]
        model = self.apply(base, args, encoder_decoder=encoder_decoder)
        return load_trainable(model, out_dir / _FILE, self.name)


def _selection_mistake(model: nn.Module, args: dict[str, Any],
                       layers: dict[str, list[int]] | None, chose_any: bool) -> str | None:
    """What is wrong with a selection: a module name the model lacks, nothing selected, or
    a listed module that adds no parameter (a silent no-op is a typo or a tied weight)."""
    modules = args["modules"] or []
    where = f"--method-arg modules={args['modules']} (method 'partial')"
    known = [name for name, _ in model.named_modules()]
    unknown = [m for m in modules if not any(_in_modules(name, [m]) for name in known)]
    if unknown:
        return f"{where}: {subject(unknown, 'names', 'name')} no module of this model"
    if not chose_any:
        return (f"method 'partial': layers={args['layers']} modules={args['modules']} select "
                "no parameter of this model")
    idle = [m for m in modules if not any(_in_layers(name, layers) and _in_modules(name, [m])
                                          for name, _ in model.named_parameters())]
    if idle:
        return (f"{where}: {subject(idle, 'selects', 'select')} no parameter to train"
                + (f" in layers {args['layers']}" if layers is not None else ""))
    return None


def _in_layers(name: str, layers: dict[str, list[int]] | None) -> bool:
    return layers is None or layer_index(name) in layers.get(stack_of(name) or "", [])


def _in_modules(name: str, modules: list[str] | None) -> bool:
    """Whether a dotted name part sequence of ``name`` is one of ``modules``."""
    return modules is None or any(f".{m}." in f".{name}." for m in modules)


def _module_names(model: nn.Module) -> list[str]:
    """Short names of the modules inside the layers (what ``modules`` can name)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
             if layer_index(name) is not None}
    return sorted(n for n in names if not n.isdigit())[:30]


def _tied_note(model: nn.Module) -> str:
    """Shared tensors are selected by their first name (a tied output head by the input
    embedding's): say which names those are."""
    first = {id(p): n for n, p in model.named_parameters()}
    aliases = [f"{n} is {first[id(p)]}" for n, p in model.named_parameters(remove_duplicate=False)
               if first[id(p)] != n]
    return f". Tied weights, selected by the second name: {'; '.join(aliases)}" if aliases else ""
