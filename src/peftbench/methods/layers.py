"""Choosing transformer layers: a user's layer selection, a model's layer count, the layer a
parameter belongs to. Shared by the methods that train chosen layers only."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from peftbench.errors import UsageError

# a parameter inside block N of a layer stack; the stack names are peft's layers_pattern
# defaults (Llama "layers", GPT-2 "h", T5 "block", BERT "layer"); the leftmost match wins,
# so T5's "block.3.layer.0" is in block 3
_IN_LAYER = re.compile(r"(?:^|\.)(?:layers|h|block|blocks|layer)\.(\d+)(?:\.|$)")
_SLICE = re.compile(r"^\[?\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\]?$")

Selection = list[int] | str | None


def parse_layers(value: Any, method: str, key: str) -> Selection:
    """A layer selection as the user gave it, normalised: ``None`` (every layer), a list of
    indices (``3``, ``[20, 21]``, "20,21", "[20,21]"; negative ones count from the end) or
    a range in Python's slice notation, kept as text because it needs the layer count
    ("-6:" = the last six, "0:4" = the first four)."""
    if value is None:
        return None
    if isinstance(value, str) and ":" in value:
        match = _SLICE.match(value.strip())
        if match is None:
            raise UsageError(_expected(value, method, key))
        start, stop = match.groups()
        return f"{start or ''}:{stop or ''}"
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        indices = [int(str(v).strip("[] ")) for v in items if str(v).strip("[] ")]
    except ValueError:
        indices = []
    if not indices:
        raise UsageError(_expected(value, method, key))
    return indices


def _expected(value: Any, method: str, key: str) -> str:
    return (f"--method-arg {key}={value!r} (method '{method}'): expected layer indices "
            f"(0 = the first layer, -1 = the last), e.g. {key}=[20,21,22], or a range "
            f"such as {key}=-6: (the last six layers; in YAML quote it: \"-6:\")")


def resolve_layers(selection: Selection, count: int | None, method: str,
                   key: str, check_bounds: bool = True) -> list[int] | None:
    """The sorted layer indices (0 to ``count - 1``) that ``selection`` names. A range's
    ends must lie within the layers, unless ``check_bounds`` is off (then it is clipped:
    a shallower stack of an encoder-decoder, the range checked on the deepest)."""
    if selection is None:
        return None
    where = f"--method-arg {key}={selection} (method '{method}')"
    if count is None:
        if isinstance(selection, list) and all(i >= 0 for i in selection):
            return sorted(set(selection))
        raise UsageError(f"{where}: the model does not say how many layers it has; give "
                         "layer indices counted from 0 instead of a range or negative ones")
    if isinstance(selection, str):
        start, stop = (int(part) if part else None for part in selection.split(":"))
        if check_bounds and any(end is not None and not -count <= end <= count
                                for end in (start, stop)):
            raise UsageError(f"{where}: the model has {count} layers; a range's ends go "
                             f"from -{count} to {count} (e.g. -{min(count, 6)}: = the last "
                             f"{min(count, 6)})")
        chosen = list(range(count))[slice(start, stop)]
        if not chosen:
            raise UsageError(f"{where}: selects none of the model's {count} layers")
        return chosen
    if any(not -count <= i < count for i in selection):
        raise UsageError(f"{where}: the model has {count} layers, indices 0 to {count - 1} "
                         f"(or -{count} to -1 from the end)")
    return sorted({i % count for i in selection})


def layer_count(model: nn.Module) -> int | None:
    """Blocks per stack (the larger stack of an encoder-decoder): from the model's config,
    else from its parameter names; None when neither says."""
    config = getattr(model, "config", None)
    counts = [getattr(config, key, None) for key in
              ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")]
    counts = [c for c in counts if isinstance(c, int)]
    if counts:
        return max(counts)
    indices = [i for name, _ in model.named_parameters()
               if (i := layer_index(name)) is not None]
    return max(indices) + 1 if indices else None


def is_relative(selection: Selection) -> bool:
    """Whether ``selection`` counts from the end (a range or a negative index)."""
    return isinstance(selection, str) or (isinstance(selection, list)
                                          and any(i < 0 for i in selection))


def stack_depths(model: nn.Module) -> dict[str, int]:
    """Blocks per layer stack, by the stack's name prefix (``model``; ``encoder`` and
    ``decoder`` for T5; ``transformer`` for GPT-2), from the parameter names."""
    depths: dict[str, int] = {}
    for name, _ in model.named_parameters():
        match = _IN_LAYER.search(name)
        if match:
            stack = name[:match.start()]
            depths[stack] = max(depths.get(stack, 0), int(match.group(1)) + 1)
    return depths


def resolve_per_stack(selection: Selection, model: nn.Module, method: str,
                      key: str) -> dict[str, list[int]] | None:
    """The chosen blocks of each layer stack: a range or negative index counts from the end
    of each stack (the last two blocks of a 4-block encoder and of a 2-block decoder);
    indices counted from 0 are checked against the deepest stack."""
    if selection is None:
        return None
    depths = stack_depths(model)
    if not is_relative(selection) or len(set(depths.values())) <= 1:
        chosen = resolve_layers(selection, layer_count(model), method, key)
        return {stack: chosen or [] for stack in depths}
    resolve_layers(selection, max(depths.values()), method, key)  # within the deepest
    return {stack: resolve_layers(selection, depth, method, key, check_bounds=False)
            for stack, depth in depths.items()}


def stack_of(name: str) -> str | None:
    """The layer stack a parameter name is in (see :func:`stack_depths`); None outside."""
    match = _IN_LAYER.search(name)
    return name[:match.start()] if match else None


def layer_index(name: str) -> int | None:
    """The block a parameter or module (dotted name) belongs to; None outside the blocks
    (embeddings, final norm, output head)."""
    match = _IN_LAYER.search(name)
    return int(match.group(1)) if match else None
