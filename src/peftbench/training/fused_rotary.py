"""The rotary position embedding as one compiled pass each way (CPU bf16 training).

Llama's attention applies ``q cos + rotate_half(q) sin`` to the queries and keys. Under
bf16 autocast on the CPU, with the float32 cos and sin of the rotary embedding, that is
about a dozen eager operations per layer forward (two slices, a negation, a ``cat``, two
products and a sum per tensor, all promoted to float32) and twice as many backward, and the
attention then casts the float32 results back to bf16. :class:`_Rotary` computes both
tensors in one pass of ``cpu_kernels.c``'s ``pb_rotary`` with eager's float32 arithmetic
and returns them in bf16, the values autocast's cast would give; the backward is one pass
per tensor, each gradient rounded once where eager rounds its two halves.

transformers' ``LlamaAttention.forward`` calls its module's ``apply_rotary_pos_emb``.
:func:`fuse_rotary` routes the forward of each Llama attention of a model (those whose
forward is ``LlamaAttention``'s own, pinned by a test against the installed transformers)
so that, while it runs, that module-level function computes through :class:`_Rotary`. The
function is hooked once by a dispatcher that calls what it replaced everywhere else (other
models, evaluation and generation, ``torch.compile``, other inputs): where the ``kernels``
package wraps the function in a module (transformers' hub kernels), the dispatcher becomes
that module's forward and the module stays the global, so that pickling a model, which
rebuilds the module from its type, is unchanged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftbench.training import cpu_kernels
from peftbench.training.forward_routing import route_forwards

_ORIGINAL_FORWARD = "_peftbench_rotary_forward"
_BF16, _F32 = torch.bfloat16, torch.float32
#: set while a routed attention's forward runs
_ROUTED: contextvars.ContextVar[bool] = contextvars.ContextVar("peftbench_rotary", default=False)
#: where the dispatcher keeps the function it replaced
_REPLACED = "_peftbench_replaced"


def _rows(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a (batch, heads, len, d) tensor (in elements)."""
    return x.stride(0), x.stride(1), x.stride(2)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           backward: bool = False) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` (or, with ``backward``, its input gradient for the
    output gradient ``x``) in bf16, laid out as ``x`` where ``x`` is dense, for bf16 ``x`` of
    shape (batch, heads, len, d) and float32 ``cos``/``sin`` of shape (batch or 1, len, d);
    see :func:`accepts`. Rows of ``x`` that are not contiguous are copied first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    batch, heads, length, d = x.shape
    cos_batch = cos.stride(0) if cos.shape[0] > 1 else 0
    cpu_kernels.compiled().pb_rotary(x.data_ptr(), *_rows(x), out.data_ptr(), *_rows(out),
                                     cos.data_ptr(), sin.data_ptr(), cos_batch, cos.stride(1),
                                     batch, heads, length, d, int(backward),
                                     torch.get_num_threads())
    return out


def accepts(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes these: ``x`` CPU bf16 (batch, heads, len, d) with ``d`` even
    and contiguous rows; ``cos`` and ``sin`` CPU float32 (1 or batch, len, d), one layout,
    contiguous rows, no gradient wanted (the tables are constants)."""
    return (x.device.type == "cpu" and x.dtype == _BF16 and x.dim() == 4
            and x.shape[-1] % 2 == 0 and x.stride(-1) == 1
            and not (cos.requires_grad or sin.requires_grad)
            and cos.dtype == sin.dtype == _F32 and cos.device.type == sin.device.type == "cpu"
            and cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.shape[0] in (1, x.shape[0]) and cos.shape[1:] == x.shape[2:]
            and cos.stride(-1) == 1)


class _Rotary(torch.autograd.Function):
    """Queries and keys rotated in bf16 by the compiled kernel, one pass each way."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return rotary(q, cos, sin), rotary(k, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor,
                 grad_k: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        return (rotary(grad_q.to(_BF16), cos, sin, backward=True) if ctx.needs_input_grad[0]
                else None,
                rotary(grad_k.to(_BF16), cos, sin, backward=True) if ctx.needs_input_grad[1]
                else None, None, None)


def _dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_rotary_pos_emb`` as ``original`` computes it, through :class:`_Rotary` while a
    routed attention runs and the inputs are what the kernel takes."""

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, unsqueeze_dim: int = 1,
                             *args: Any, **kwargs: Any) -> Any:
        if (not torch.compiler.is_compiling() and _ROUTED.get() and unsqueeze_dim == 1
                and not args and not kwargs and accepts(q, cos, sin) and accepts(k, cos, sin)):
            return _Rotary.apply(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _REPLACED, original)
    return apply_rotary_pos_emb


def _routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The attention's own forward, with the fused rotary embedding for bf16 training."""
    original = getattr(self, _ORIGINAL_FORWARD)
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != _BF16):
        return original(*args, **kwargs)
    token = _ROUTED.set(True)
    try:
        return original(*args, **kwargs)
    finally:
        _ROUTED.reset(token)


def _fusable(module: nn.Module) -> bool:
    from transformers.models.llama import modeling_llama

    return type(module).forward is modeling_llama.LlamaAttention.forward


def transformers_rotary() -> Callable[..., Any]:
    """transformers' Llama ``apply_rotary_pos_emb`` as it was before :func:`fuse_rotary`."""
    from transformers.models.llama import modeling_llama

    target = modeling_llama.apply_rotary_pos_emb
    function = target.forward if isinstance(target, nn.Module) else target
    return getattr(function, _REPLACED, target)


def _hook_rotary() -> None:
    """Put :func:`_dispatcher` in front of transformers' Llama ``apply_rotary_pos_emb``, once:
    as the forward of the ``kernels`` package's function module, else as the global."""
    from transformers.models.llama import modeling_llama

    target = modeling_llama.apply_rotary_pos_emb
    if isinstance(target, nn.Module):
        if not hasattr(target.forward, _REPLACED):
            target.forward = _dispatcher(target.forward)
    elif not hasattr(target, _REPLACED):
        modeling_llama.apply_rotary_pos_emb = _dispatcher(target)


def fuse_rotary(model: nn.Module) -> int:
    """Route every Llama attention of ``model`` through the fused rotary embedding (the
    training forward under CPU bf16 autocast); returns how many, 0 without the compiled
    kernels (idempotent). Parameters and state dict are unchanged."""
    if not cpu_kernels.available():
        return 0
    routed = route_forwards(model, _fusable, _routed_forward, _ORIGINAL_FORWARD)
    if routed:
        _hook_rotary()
    return routed
