"""Attention keeping only its bf16 inputs, with flash-attention precision: output and
gradients about as accurate as the fp32 math kernel's, less kept for the backward, routed
only on the CPU bf16 path and only while gradients are recorded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_models import greedy_generations, grouped_query_llama, padded_batch
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training import cpu_kernels, recomputed_attention
from peftbench.training.device import autocast_factory
from peftbench.training.model_prep import place_for_training
from peftbench.training.recomputed_attention import (
    IMPLEMENTATION,
    _Attention,
    _prepared_mask,
    use_recomputed_attention,
)

BATCH, LENGTH, DIM = 4, 11, 16


def _inputs(heads: int, kv_heads: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(BATCH, heads, LENGTH, DIM, generator=gen) * 2).bfloat16()
    k = (torch.randn(BATCH, kv_heads, LENGTH, DIM, generator=gen) * 2).bfloat16()
    v = torch.randn(BATCH, kv_heads, LENGTH, DIM, generator=gen).bfloat16()
    grad = torch.randn(BATCH, LENGTH, heads, DIM, generator=gen).bfloat16()
    return q, k, v, grad


def _padding_mask(first_row_dead: bool = False) -> torch.Tensor:
    """Causal and right padding (lengths 11, 8, 5, 11), as transformers' sdpa mask."""
    keys = torch.arange(LENGTH)[None, :] < torch.tensor([LENGTH, 8, 5, LENGTH])[:, None]
    mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()[None, None] & keys[:, None, None]
    if first_row_dead:
        mask[3, :, 0] = False  # query 0 of row 3 has no key to attend
    return mask


def _kernel(q, k, v, grad, mask, dtype):
    """The math kernel as transformers calls it with a mask: key/value heads repeated."""
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                             v.repeat_interleave(groups, 1), attn_mask=mask)
    out = out.transpose(1, 2)
    out.backward(grad.to(dtype))
    return out, q.grad, k.grad, v.grad


def _recomputed(q, k, v, grad, mask):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    additive, dead = _prepared_mask(mask, LENGTH, q.device)
    out = _Attention.apply(q, k, v, additive, dead, DIM ** -0.5)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


@pytest.fixture(params=[True, False], ids=["compiled", "pytorch"])
def probabilities_by(request, monkeypatch):
    """Each test below once with the compiled probabilities (where the kernels are compiled
    with AVX-512 BF16) and once with PyTorch's operations."""
    if request.param and not cpu_kernels.bf16_dot():
        pytest.skip("no AVX-512 BF16 kernels: PyTorch's operations only")
    monkeypatch.setattr(recomputed_attention, "kernel_enabled", request.param)
    return request.param


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (6, 6), (6, 1)])
@pytest.mark.parametrize("dead_row", [False, True])
def test_output_and_gradients_are_about_as_accurate_as_the_math_kernels(heads, kv_heads,
                                                                        dead_row,
                                                                        probabilities_by):
    """Against float64: every element within two bf16 roundings of the largest, and the
    whole tensor within twice the fp32 math kernel's error (measured: up to 1.5 times, from
    the probabilities and their gradients rounded to bf16)."""
    q, k, v, grad = _inputs(heads, kv_heads)
    mask = _padding_mask(dead_row)
    exact = _kernel(q, k, v, grad, mask, torch.float64)
    kernel = _kernel(q, k, v, grad, mask, torch.bfloat16)
    mine = _recomputed(q, k, v, grad, mask)
    assert mine[0].dtype == torch.bfloat16 and mine[0].is_contiguous()
    for ours, theirs, truth in zip(mine, kernel, exact, strict=True):
        assert ours.dtype == torch.bfloat16 and ours.shape == truth.shape
        assert (ours.double() - truth).abs().max() <= 2 ** -7 * truth.abs().max()
        assert (ours.double() - truth).norm() <= 2 * (theirs.double() - truth).norm()
    if dead_row:  # safe softmax: nothing flows from or to the row with no key
        assert not mine[0][3, 0].any() and not mine[1][3, :, 0].any()


def test_backward_is_the_closed_form_not_a_near_miss(probabilities_by):
    """Against float64 autograd of plain attention: a missing softmax correction term or a
    scale applied once instead of per side is off by far more than bf16 rounding."""
    q, k, v, grad = _inputs(4, 2, seed=3)
    mask = _padding_mask()
    exact = _kernel(q, k, v, grad, mask, torch.float64)
    mine = _recomputed(q, k, v, grad, mask)
    for ours, truth in zip(mine[1:], exact[1:], strict=True):
        error = (ours.double() - truth).norm() / truth.norm()
        assert error < 5e-3


def test_without_a_mask_the_attention_is_causal(probabilities_by):
    q, k, v, grad = _inputs(4, 2, seed=5)
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()[None, None]
    with_mask = _recomputed(q, k, v, grad, causal)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    additive, dead = _prepared_mask(None, LENGTH, q.device)
    assert dead is None
    out = _Attention.apply(qq, kk, vv, additive, dead, DIM ** -0.5)
    out.backward(grad)
    assert torch.equal(out, with_mask[0]) and torch.equal(qq.grad, with_mask[1])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_a_model_under_bf16_autocast_gives_nearly_the_same_loss_and_keeps_less(kv_heads):
    """A whole model, switched, under peftbench's CPU bf16 autocast: the same loss within
    bf16 rounding of the attention's probabilities, gradients within bf16 rounding, and no
    fp32 copy of queries, keys, values or
    probabilities kept for the backward."""
    autocast = autocast_factory(torch.device("cpu"), "bf16")
    batch = padded_batch()
    results = []
    for switched in (False, True):
        model = grouped_query_llama(kv_heads)
        if switched:
            assert use_recomputed_attention(model) == 1 == use_recomputed_attention(model)
            assert model.config._attn_implementation == IMPLEMENTATION
        with autocast():
            kept, loss = _saved(lambda m=model: m(**batch).loss)
        loss.backward()
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        fp32_per_head = [t for t in kept if t.dtype == torch.float32 and t.dim() >= 3
                         and t.shape[0] > 1 and head_dim in t.shape[-2:]]
        results.append((loss.item(), [p.grad for p in model.parameters()], fp32_per_head))
    (loss, grads, fp32), (loss_switched, grads_switched, fp32_switched) = results
    assert abs(loss_switched - loss) <= 1e-3 * abs(loss)
    for theirs, ours in zip(grads, grads_switched, strict=True):
        assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max() + 1e-6
    assert fp32 and not fp32_switched  # the kernel's fp32 queries, keys and values


def test_only_the_bf16_inputs_and_the_mask_are_kept():
    """The kernel as transformers calls it keeps fp32 copies of q, k (repeated per query
    head), v and the probabilities; the recomputed attention keeps its inputs' own storage."""
    q, k, v, grad = _inputs(6, 2)
    mask = _padding_mask()
    additive, dead = _prepared_mask(mask, LENGTH, q.device)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    mine = _storage_bytes(_saved(lambda: _Attention.apply(*inputs, additive, dead,
                                                          DIM ** -0.5))[0])
    assert set(mine) == {t.untyped_storage().data_ptr() for t in (*inputs, additive)}
    kernel = _storage_bytes(_saved(lambda: _kernel(q, k, v, grad, mask, torch.bfloat16))[0])
    assert sum(mine.values()) < sum(kernel.values()) / 3


def _saved(run) -> tuple[list[torch.Tensor], object]:
    """The tensors autograd keeps while ``run()`` builds its graph, and what it returns."""
    kept: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return kept, result


def _storage_bytes(tensors: list[torch.Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.skipif(not cpu_kernels.bf16_dot(), reason="no AVX-512 BF16 kernels")
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "dim", "mask_kind"), [
    (3, 4, 2, 70, 24, "padding"), (2, 3, 3, 17, 7, "causal"), (2, 2, 1, 129, 32, "padding")])
def test_the_compiled_probabilities_are_pytorchs(batch, heads, kv_heads, length, dim,
                                                 mask_kind, monkeypatch):
    """The compiled scores, softmax and softmax gradient against PyTorch's operations on
    the same bf16 inputs: lengths past one 64-key block and with tails, odd head sizes, a
    shared causal mask and per-row padding with a query that sees no key. Both round the
    same float32 values to bf16, up to float32 sums in another order: a few elements one
    bf16 step apart."""
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(batch, heads, length, dim, generator=gen) * 2).bfloat16()
    k = (torch.randn(batch, kv_heads, length, dim, generator=gen) * 2).bfloat16()
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16()
    grad = torch.randn(batch, length, heads, dim, generator=gen).bfloat16()
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if mask_kind == "causal":
        mask = None
    else:
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = causal & (torch.arange(length)[None, :] < lengths[:, None])[:, None, None]
        mask[0, :, 0] = False  # a query with no key to attend
    additive, dead = _prepared_mask(mask, length, q.device)
    assert recomputed_attention._kernel_takes(q, k, v, additive)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(recomputed_attention, "kernel_enabled", compiled)
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _Attention.apply(*inputs, additive, dead, dim ** -0.5)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for ours, theirs in zip(*results, strict=True):
        difference = (ours.double() - theirs.double()).abs()
        assert difference.max() <= 2 ** -7 * theirs.abs().max()
        assert difference.norm() <= 1e-3 * theirs.double().norm()
        assert (difference > 0).double().mean() <= 0.02
    if mask_kind != "causal":
        assert not results[0][0][0, 0].any()  # no key: zero output and no gradient
        assert not results[0][1][0, :, 0].any()


@pytest.mark.skipif(not cpu_kernels.bf16_dot(), reason="no AVX-512 BF16 kernels")
def test_the_compiled_probabilities_propagate_nan_and_inf_as_pytorch():
    """A NaN key, or a score that overflows to +inf, makes its query rows NaN in both paths
    (a kernel taking the maximum lane by lane could skip the NaN, and exp(inf - inf) could
    come out as a uniform row)."""
    q, k, v, _ = _inputs(4, 2, seed=2)
    k[1, 0, 3] = float("nan")
    # q k^T overflows to +inf for query 5 of head 1 and key 2 only (every product of
    # theirs is +inf; no other sum reaches the float32 range, so no inf - inf)
    q[2, 1, 5] = k[2, 0, 2] = 1e36
    additive, dead = _prepared_mask(_padding_mask(), LENGTH, q.device)
    outputs = []
    for compiled in (True, False):
        recomputed_attention.kernel_enabled = compiled
        try:
            outputs.append(_Attention.apply(q, k, v, additive, dead, DIM ** -0.5))
        finally:
            recomputed_attention.kernel_enabled = True
    ours, theirs = outputs
    assert theirs[1].isnan().any() and theirs[2, 5, 1].isnan().all()
    assert torch.equal(ours.isnan(), theirs.isnan())


def test_the_compiled_probabilities_take_only_their_shape():
    """bf16 inputs with queries as long as keys and a (batch or 1, 1, n, n) mask, else
    PyTorch's operations."""
    q, k, v, _ = _inputs(4, 2)
    additive, _ = _prepared_mask(_padding_mask(), LENGTH, q.device)
    assert recomputed_attention._kernel_takes(q, k, v, additive) == cpu_kernels.bf16_dot()
    assert not recomputed_attention._kernel_takes(q.float(), k, v, additive)
    assert not recomputed_attention._kernel_takes(q[:, :, :-1], k, v, additive)
    assert not recomputed_attention._kernel_takes(q, k, v, additive.expand(-1, 4, -1, -1))


def test_a_mask_per_head_is_handed_to_transformers(monkeypatch):
    """Masks that differ between heads (batch, heads, q, k) go to transformers' own sdpa;
    one mask for every head is computed here."""
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda *args, **kwargs: ("transformers", None))
    q, k, v, _ = _inputs(4, 2)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    mask = _padding_mask()
    shared = recomputed_attention.recomputed_sdpa(torch.nn.Module(), *inputs, mask)[0]
    assert isinstance(shared, torch.Tensor) and shared.grad_fn is not None
    per_head = mask.expand(-1, 4, -1, -1)
    assert recomputed_attention.recomputed_sdpa(torch.nn.Module(), *inputs,
                                                per_head)[0] == "transformers"


def test_evaluation_and_generation_are_transformers_own():
    """Without gradients (evaluation, generation steps) transformers' sdpa runs unchanged."""
    assert torch.equal(*greedy_generations(use_recomputed_attention,
                                           autocast_factory(torch.device("cpu"), "bf16")))


@pytest.mark.parametrize(("precision", "exact", "switched"), [
    ("bf16", False, True), ("fp32", False, False), ("fp32", True, False)])
def test_placement_switches_attention_only_on_the_cpu_bf16_path(precision, exact, switched):
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
    applied = place_for_training(model, precision, torch.device("cpu"), exact=exact)
    assert applied.get("recomputed_attention", 0) == int(switched)
    assert (model.config._attn_implementation == IMPLEMENTATION) == switched
