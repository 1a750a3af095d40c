"""The rotary embedding's compiled pass (CPU bf16 training): eager's forward values bit for
bit in transformers' layouts, the gradient within one bf16 rounding of float64's, a model
through it against transformers' own function, and everything else left to that function."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from lora_models import IDS, graph_nodes, tiny_lora_llama
from peftbench.training import cpu_kernels, fused_rotary
from peftbench.training.model_prep import place_for_training

BF16, F32 = torch.bfloat16, torch.float32

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C compiler: transformers' rotary embedding is used")


def _cos_sin(batch: int, length: int, d: int, offset: int = 0):
    """transformers' rotary tables (float32, (batch, length, d)), positions shifted by row."""
    positions = torch.arange(length)[None].float() + offset * torch.arange(batch)[:, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _original():
    return fused_rotary.transformers_rotary()


def _random_tables(batch: int, length: int, d: int, seed: int = 5):
    """cos and sin whose halves differ (real rotary tables repeat their first half), so a
    swapped half index shows."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, d, generator=gen),
            torch.randn(batch, length, d, generator=gen))


@pytest.mark.parametrize(("batch", "heads", "length", "d", "per_row"), [
    (3, 9, 11, 64, False),    # transformers' layout, shared tables
    (2, 4, 7, 6, True),       # small head size, tables per row (padding-aware positions)
    (16, 9, 50, 64, False),   # several threads
])
@pytest.mark.parametrize("layout", ["transformers", "contiguous", "column slice"])
@pytest.mark.parametrize("tables", ["rotary", "random"])
def test_forward_is_eagers_float32_result_cast_to_bf16(batch, heads, length, d, per_row,
                                                       layout, tables):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, heads, d, generator=gen).to(BF16).transpose(1, 2)
    if layout == "contiguous":
        x = x.contiguous()
    elif layout == "column slice":  # rows 2 d apart: the output gets its own layout
        x = torch.randn(batch, heads, length, 2 * d, generator=gen).to(BF16)[..., :d]
    rows = batch if per_row else 1
    cos, sin = (_cos_sin(rows, length, d, offset=3 if per_row else 0) if tables == "rotary"
                else _random_tables(rows, length, d))
    assert fused_rotary.accepts(x, cos, sin)
    want, _ = _original()(x, x, cos, sin)
    got = fused_rotary.rotary(x, cos, sin)
    assert want.dtype == F32 and got.dtype == BF16
    assert got.is_contiguous() if layout == "column slice" else got.stride() == x.stride()
    assert torch.equal(got, want.to(BF16))


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("tables", ["rotary", "random"])
def test_the_gradient_is_float64s_rounded_once(grad_layout, tables):
    """Also for output gradients whose rows are not contiguous (eager attention hands k's
    gradient transposed) or that are broadcast (a sum's gradient)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 4, 64, generator=gen).to(BF16).transpose(1, 2)
    k = torch.randn(2, 9, 2, 64, generator=gen).to(BF16).transpose(1, 2)
    cos, sin = _cos_sin(2, 9, 64, offset=2) if tables == "rotary" else _random_tables(2, 9, 64)
    q, k = q.requires_grad_(), k.requires_grad_()
    grads = [torch.randn(t.shape, generator=gen).to(BF16) for t in (q, k)]
    if grad_layout == "transposed":
        grads = [g.transpose(-1, -2).contiguous().transpose(-1, -2) for g in grads]
    elif grad_layout == "broadcast":
        grads = [torch.randn((), generator=gen).to(BF16).expand(t.shape) for t in (q, k)]
    torch.autograd.backward(fused_rotary._Rotary.apply(q, k, cos, sin), grads)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    torch.autograd.backward(_original()(q64, k64, cos.double(), sin.double()),
                            [g.double() for g in grads])
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad)):
        assert got.dtype == BF16
        error = (got.double() - want).abs()
        assert bool((error <= 2.0 ** -8 * want.abs() + 1e-6).all())


def test_refused_inputs():
    x = torch.randn(2, 3, 5, 8).to(BF16)
    cos, sin = _cos_sin(1, 5, 8)
    assert fused_rotary.accepts(x, cos, sin)
    assert not fused_rotary.accepts(x.float(), cos, sin)             # float32 input
    assert not fused_rotary.accepts(x[..., :7], cos[..., :7], sin[..., :7])  # odd size
    assert not fused_rotary.accepts(x, cos.to(BF16), sin.to(BF16))   # bf16 tables
    assert not fused_rotary.accepts(x, cos[:, :4], sin[:, :4])       # other length
    assert not fused_rotary.accepts(x[..., ::2], cos[..., ::2], sin[..., ::2])  # strided rows
    assert not fused_rotary.accepts(x, cos.requires_grad_(), sin)  # tables wanting a gradient


def _loss_and_grads(model: torch.nn.Module):
    model.zero_grad()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=BF16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_model_trains_through_it_as_through_transformers_rotary_embedding():
    """The same forward bit for bit (the loss is equal), gradients within bf16 rounding."""
    model = tiny_lora_llama({"dropout": 0.0})
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["fused_rotary"] == model.config.num_hidden_layers
    loss, grads = _loss_and_grads(model)
    assert graph_nodes(loss).count("_RotaryBackward") == model.config.num_hidden_layers
    attentions = [m for m in model.modules() if hasattr(m, fused_rotary._ORIGINAL_FORWARD)]
    for attention in attentions:
        attention.forward = getattr(attention, fused_rotary._ORIGINAL_FORWARD)
    plain_loss, plain_grads = _loss_and_grads(model)
    assert "_RotaryBackward" not in graph_nodes(plain_loss)
    assert loss.item() == plain_loss.item()
    assert grads.keys() == plain_grads.keys() and grads
    for name, want in plain_grads.items():
        assert ((grads[name] - want).norm() / want.norm()).item() < 2e-2, name


def test_outside_routed_training_the_function_is_transformers_own(monkeypatch):
    """Evaluation, generation, torch.compile and other models in the process get the
    original function; other models still pickle."""
    import io

    from peftbench.models import load_model

    kind = type(modeling_llama.apply_rotary_pos_emb)
    model = tiny_lora_llama()
    place_for_training(model, "bf16", torch.device("cpu"))
    assert type(modeling_llama.apply_rotary_pos_emb) is kind  # hooked, not replaced
    other = load_model("tiny-random-llama", seed=0).model
    buffer = io.BytesIO()
    torch.save(other, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    with torch.autocast("cpu", dtype=BF16):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert "_RotaryBackward" not in graph_nodes(model(input_ids=IDS, labels=IDS).loss)
        monkeypatch.undo()
        assert "_RotaryBackward" in graph_nodes(model(input_ids=IDS, labels=IDS).loss)
    x = torch.randn(2, 3, 5, 8).to(BF16)
    cos, sin = _cos_sin(1, 5, 8)
    with torch.autocast("cpu", dtype=BF16):
        q, _ = modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)  # not in a routed forward
    assert q.dtype == F32 and torch.equal(q, _original()(x, x, cos, sin)[0])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert "_RotaryBackward" not in graph_nodes(model(input_ids=IDS, labels=IDS).loss)
    assert fused_rotary.fuse_rotary(model) == model.config.num_hidden_layers  # idempotent
    target = modeling_llama.apply_rotary_pos_emb
    hook = target.forward if isinstance(target, torch.nn.Module) else target
    assert not hasattr(getattr(hook, fused_rotary._REPLACED), fused_rotary._REPLACED)  # once


@pytest.mark.parametrize("exact", [False, True])
def test_fp32_placements_do_not_use_it(exact):
    model = tiny_lora_llama()
    applied = place_for_training(model, "fp32", torch.device("cpu"), exact=exact)
    assert "fused_rotary" not in applied
    assert not any(hasattr(m, fused_rotary._ORIGINAL_FORWARD) for m in model.modules())
