"""Attention that keeps only its bf16 inputs and computes its probabilities again in the
backward (CPU bf16 path).

On CPU, torch's math attention kernel computes a bf16 attention in fp32: it copies the
queries, keys and values to fp32 and keeps those copies for the backward, with the fp32
probabilities; with a padding mask transformers also repeats every key/value head once per
query head first. For SmolLM2-135M (9 query heads, 3 key/value heads) at 16 x 53 tokens
that is about 11 MB per layer, 326 MB of the 771 MB an all-linear LoRA step keeps.

:class:`_Attention` keeps only ``q``, ``k`` and ``v`` as they arrive: in bf16 (under
autocast they are cast to bf16 first, as autocast casts them for the kernel), and
``k``/``v`` once per key/value head, the query heads of a group stacked as rows against
their shared key/value head. The backward computes the probabilities again from them and
returns gradients in bf16. Fully masked query rows get zero probabilities, as the kernel's
safe softmax gives them.

Precision as in flash-attention kernels (FlashAttention-2 rounds its probabilities and
their gradients to the input type for the matrix products with ``v``, ``k`` and ``q``):
the scores ``q k^T``, the softmax and the probabilities' gradient ``g v^T`` are fp32,
products of bf16 values summed in fp32; the probabilities ``P`` and the scores' gradient
``dS`` are rounded to bf16 for the four products that give the output (``P v``) and the
gradients (``P^T g``, ``dS k``, ``dS^T q``), which run as bf16 matmuls, each about 4 times
as fast as in fp32 on a CPU with bf16 units. The math kernel computes all seven in fp32:
its output is the fp32 result rounded once to bf16, where this one's is within about two
bf16 roundings of it (tested).

Where ``cpu_kernels.c`` is compiled with AVX-512 BF16, ``P`` (and, backward, ``dS``) come
from one compiled pass per batch row and key/value head (``pb_attention_probs``,
``pb_attention_grads``: ``q k^T`` and ``g v^T`` by bf16 dot products, the scores scaled
once after the sum, a vectorised softmax); elsewhere from PyTorch's fp32 operations (``q``
and ``k`` each scaled by ``sqrt(scale)`` first, the math kernel's order). Both give the
same bf16 values but for the odd element one bf16 step apart (tested). On SmolLM2's shape
(16 x 53 tokens, 9 query and 3 key/value heads) one layer's attention took 4.4-5.9 ms
forward and backward in fp32, 2.8-3.3 ms with the bf16 products and 1.85-1.95 ms with the
compiled probabilities.

:func:`recomputed_sdpa` is registered with transformers' ``AttentionInterface`` under
:data:`IMPLEMENTATION`. It handles the training shape only (CPU, bf16 inputs or bf16
autocast, gradients recorded, queries as long as keys, no attention dropout, position bias
or softcap) and hands everything else, generation and evaluation included, to
transformers' own ``sdpa_attention_forward``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftbench.training import cpu_kernels
from peftbench.training.lean_attention import (
    additive_mask,
    is_training_shape,
    once_per_mask,
    switch_attention,
)

_BF16 = torch.bfloat16
#: switched off by tests and benchmarks/ablation.py (``attention_kernel``) to compare the
#: compiled probabilities with PyTorch's operations; read at every call
kernel_enabled = True
#: the attention implementation name models are switched to
IMPLEMENTATION = "peftbench_recomputed_sdpa"
#: where a mask keeps its additive fp32 version and its fully masked rows (one per forward)
_PREPARED = "_peftbench_recomputed_mask"


def _prepared_mask(mask: torch.Tensor | None, length: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(additive fp32 mask of shape (batch or 1, 1, length, length), rows with no key to
    attend or None), made once per mask tensor and version; no mask means causal."""
    if mask is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
        return _with_dead_rows(causal.view(1, 1, length, length))
    return once_per_mask(mask, _PREPARED, _with_dead_rows)


def _with_dead_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    additive = (additive_mask(mask, torch.float32) if mask.dtype == torch.bool
                else mask.to(torch.float32))
    dead = additive.amax(-1, keepdim=True).isneginf()
    return additive, (dead if bool(dead.any()) else None)


def _grouped(x: torch.Tensor, groups: int, factor: float = 1.0) -> torch.Tensor:
    """bf16 (batch, heads, length, dim) as a new fp32 (batch, heads / groups, groups *
    length, dim), times ``factor``."""
    b, h, n, d = x.shape
    out = x.to(torch.float32, memory_format=torch.contiguous_format).view(
        b, h // groups, groups * n, d)
    return out.mul_(factor) if factor != 1.0 else out


def _grouped_bf16(x: torch.Tensor, groups: int) -> torch.Tensor:
    """bf16 (batch, heads, length, dim) as bf16 (batch, heads / groups, groups * length,
    dim): a view where ``x`` is contiguous, else a copy."""
    b, h, n, d = x.shape
    return x.contiguous().view(b, h // groups, groups * n, d)


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                   dead: torch.Tensor | None, groups: int) -> torch.Tensor:
    """softmax(q k^T + mask) in fp32 for ``q`` and ``k`` already scaled, rows grouped as
    :func:`_grouped`."""
    b, kv, rows, n = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.view(b, kv, groups, rows // groups, n).add_(mask.unsqueeze(1))
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs.view(b, kv, groups, rows // groups, n).masked_fill_(dead.unsqueeze(1), 0.0)
    return probs


class _Attention(torch.autograd.Function):
    """bf16 ``q`` (batch, heads, length, dim), ``k``/``v`` (batch, kv heads, length, dim) to
    the bf16 output in transformers' layout (batch, length, heads, dim): scores and softmax
    in fp32, the products with the probabilities and their gradients in bf16."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor, dead: torch.Tensor | None, scale: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        with torch.autocast("cpu", enabled=False):
            q16, k16, v16 = _grouped_bf16(q, groups), k.contiguous(), v.contiguous()
            if _kernel_takes(q, k, v, mask):
                probs = _compiled(q16, k16, mask, scale)[0]
            else:
                probs = _scaled_probabilities(q, k, mask, dead, scale).to(_BF16)
            out = torch.matmul(probs, v16).view(q.shape)
        ctx.save_for_backward(q, k, v, mask, dead)
        ctx.scale = scale
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, mask, dead = ctx.saved_tensors
        groups, scale = q.shape[1] // k.shape[1], ctx.scale
        with torch.autocast("cpu", enabled=False):
            q16, k16, v16 = _grouped_bf16(q, groups), k.contiguous(), v.contiguous()
            g = _grouped_bf16(grad.to(_BF16).transpose(1, 2), groups)
            if _kernel_takes(q, k, v, mask):
                probs, grad_scores = _compiled(q16, k16, mask, scale, g, v16)
            else:
                fp32_probs = _scaled_probabilities(q, k, mask, dead, scale)
                grad_probs = torch.matmul(g.float(), v16.float().transpose(-1, -2))
                # softmax backward: p * (dL/dp - sum(dL/dp * p)); scores = scale q k^T
                coef = torch.linalg.vecdot(grad_probs, fp32_probs).unsqueeze(-1)
                grad_scores = grad_probs.sub_(coef).mul_(fp32_probs).mul_(scale).to(_BF16)
                probs = fp32_probs.to(_BF16)
            grad_v = torch.matmul(probs.transpose(-1, -2), g)
            grad_q = torch.matmul(grad_scores, k16).view(q.shape)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q16)
        return grad_q, grad_k, grad_v, None, None, None


def _scaled_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                          dead: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 ``softmax(scale q k^T + mask)``, ``q`` and ``k`` each scaled by ``sqrt(scale)``
    in fp32 as the math kernel does, rows grouped as :func:`_grouped`."""
    groups, root = q.shape[1] // k.shape[1], math.sqrt(scale)
    return _probabilities(_grouped(q, groups, root), _grouped(k, 1, root), mask, dead, groups)


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor) -> bool:
    """Whether the compiled kernels compute the probabilities: switched on, compiled with
    AVX-512 BF16, bf16 ``q``, ``k`` and ``v`` (batch, heads, length, dim) with queries as
    long as keys, and a mask of shape (batch or 1, 1, length, length)."""
    b, n = q.shape[0], k.shape[2]
    return (kernel_enabled and cpu_kernels.bf16_dot()
            and q.dtype == k.dtype == v.dtype == _BF16 and q.shape[2] == n
            and mask.dim() == 4 and mask.shape[0] in (1, b)
            and tuple(mask.shape[1:]) == (1, n, n))


def _compiled(q16: torch.Tensor, k16: torch.Tensor, mask: torch.Tensor, scale: float,
              g16: torch.Tensor | None = None,
              v16: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """bf16 probabilities (batch, kv heads, rows, length) from ``cpu_kernels.c``'s
    ``pb_attention_probs``; with ``g16`` and ``v16``, and the bf16 gradient of ``q k^T``
    (``pb_attention_grads``)."""
    b, kv, rows, d = q16.shape
    n = k16.shape[2]
    mask = mask.to(torch.float32).contiguous()
    stride = n * n if mask.shape[0] > 1 else 0
    threads, library = torch.get_num_threads(), cpu_kernels.compiled()
    # held here: the kernels write into it
    work = torch.empty(threads * library.pb_attention_work(n, d), dtype=torch.float32)
    probs = torch.empty(b, kv, rows, n, dtype=_BF16)
    if g16 is None:
        library.pb_attention_probs(q16.data_ptr(), k16.data_ptr(), mask.data_ptr(), stride,
                                   b, kv, rows, n, d, scale, probs.data_ptr(),
                                   work.data_ptr(), threads)
        return (probs,)
    grad_scores = torch.empty_like(probs)
    library.pb_attention_grads(q16.data_ptr(), k16.data_ptr(), v16.data_ptr(), g16.data_ptr(),
                               mask.data_ptr(), stride, b, kv, rows, n, d, scale,
                               probs.data_ptr(), grad_scores.data_ptr(), work.data_ptr(),
                               threads)
    return probs, grad_scores


def _bf16_inputs(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The inputs as the bf16 the math kernel would get: bf16 already, or floating point
    under CPU bf16 autocast (which casts them for attention); None otherwise."""
    if all(x.dtype == torch.bfloat16 for x in inputs):
        return inputs
    if (torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and all(x.is_floating_point() for x in inputs)):
        return tuple(x.to(torch.bfloat16) for x in inputs)
    return None


def recomputed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` for the bf16 training shape through
    :class:`_Attention`, anything else handed to it unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    inputs = None
    if (torch.is_grad_enabled() and not dropout and query.shape[1] % key.shape[1] == 0
            and (attention_mask is not None or causal)
            and (attention_mask is None  # one mask for every head: (batch or 1, 1, q, k)
                 or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
            and is_training_shape(query, key, value, kwargs)):
        inputs = _bf16_inputs(query, key, value)
    if inputs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    query, key, value = inputs
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        attention_mask = attention_mask[:, :, :, :key.shape[2]]
    mask, dead = _prepared_mask(attention_mask, key.shape[2], query.device)
    return _Attention.apply(query, key, value, mask, dead, scale), None


def use_recomputed_attention(model: nn.Module) -> int:
    """Switch every Hugging Face model in ``model`` that uses ``sdpa`` attention to
    :func:`recomputed_sdpa`; returns how many models (idempotent)."""
    return switch_attention(model, IMPLEMENTATION, recomputed_sdpa)
