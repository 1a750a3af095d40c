"""A note instead of a tensor for the backward: cheap tensors computed again, not kept.

Inside :meth:`Notes.active`, a tensor that autograd saves for the backward and that is (a
view of) a tensor registered with :meth:`Notes.add` is kept as a note: a function that
computes it again from tensors kept anyway, called when the backward unpacks it. Every
other tensor goes on to the saved-tensor hooks active outside (a probe, torch's
``save_on_cpu``), or is kept as is.

The registered tensors are held only while the scope is open, so their memory cannot be
reused by another tensor that a later save would mistake for them. Autograd holds the pack
function until the backward, so it reaches nothing but the recompute functions of the notes
it made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

Recompute = Callable[[], torch.Tensor]


class _Note(NamedTuple):
    recompute: Recompute
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _outer_hooks() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None:
    """The saved-tensor hooks active now, if any (torch has no public getter)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class Notes:
    """Tensors of one scope (a decoder layer, a projection) to keep as notes."""

    def __init__(self) -> None:
        self._held: list[torch.Tensor] = []
        self._recipes: dict[int, tuple[torch.dtype, Recompute]] = {}

    def add(self, tensor: torch.Tensor, recompute: Recompute) -> None:
        """Keep ``tensor`` as a note that calls ``recompute``, which must return the same
        values in a contiguous tensor of the same shape. Only a tensor that requires grad and
        fills its own storage from the start is noted; any other is kept as usual."""
        if (tensor.requires_grad and tensor.is_contiguous() and tensor.storage_offset() == 0
                and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.itemsize):
            self._held.append(tensor)
            self._recipes[_storage(tensor)] = (tensor.dtype, recompute)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Saved-tensor hooks that keep the registered tensors as notes."""
        recipes, used = self._recipes, set()
        outer = _outer_hooks()

        def pack(tensor: torch.Tensor) -> Any:
            key = _storage(tensor)
            recipe = recipes.get(key)
            if recipe is not None and recipe[0] == tensor.dtype:
                used.add(key)
                return _Note(recipe[1], tensor.size(), tensor.stride(), tensor.storage_offset())
            return outer[0](tensor) if outer else tensor

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, _Note):
                with torch.no_grad():
                    again = packed.recompute()
                return again.as_strided(packed.size, packed.stride, packed.offset)
            return outer[1](packed) if outer else packed

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            self._held.clear()
            for key in set(recipes) - used:
                del recipes[key]
