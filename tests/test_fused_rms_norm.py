"""RMSNorm as one autograd function: transformers' forward bit for bit, its gradients within
fp32 rounding, routed only on the CPU bf16 path and only while gradients are recorded."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.fused_rms_norm import _RmsNorm, fuse_rms_norms
from peftbench.training.model_prep import place_for_training


def _norm(weight_dtype: torch.dtype, trains: bool) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=torch.Generator().manual_seed(1)))
    return norm.to(weight_dtype).requires_grad_(trains)


def _run(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    out = norm(x)
    out.backward(grad.to(out.dtype))
    return out, x.grad, norm.weight.grad


@pytest.mark.parametrize(("x_dtype", "weight_dtype", "trains"), [
    (torch.float32, torch.bfloat16, False),  # the bf16 path: fp32 residual, frozen bf16 norm
    (torch.float32, torch.float32, True),  # full fine-tuning trains the norm's weight
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float64, torch.float64, True),
])
def test_fused_norm_is_transformers_forward_and_its_gradients(x_dtype, weight_dtype, trains):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=gen) * 4).to(x_dtype)
    grad = torch.randn(3, 7, 48, generator=gen)
    plain, fused = _norm(weight_dtype, trains), _norm(weight_dtype, trains)
    assert fuse_rms_norms(fused) == 1 == fuse_rms_norms(fused)  # idempotent
    out_plain, gx_plain, gw_plain = _run(plain, x, grad)
    out_fused, gx_fused, gw_fused = _run(fused, x, grad)
    assert type(out_fused.grad_fn).__name__ == "_RmsNormBackward"
    assert out_fused.dtype == out_plain.dtype and torch.equal(out_fused, out_plain)
    tolerance = 1e-2 if x_dtype == torch.bfloat16 else 1e-5  # both compute in fp32
    assert gx_fused.dtype == x_dtype
    assert (gx_fused - gx_plain).abs().max() <= tolerance * gx_plain.abs().max()
    if trains:
        assert gw_fused.dtype == weight_dtype
        assert (gw_fused - gw_plain).abs().max() <= tolerance * gw_plain.abs().max()
    else:
        assert gw_fused is None


def test_backward_is_the_closed_form_not_a_near_miss():
    """Against float64 autograd of ``w * x / sqrt(mean(x^2) + eps)`` with no fp32 step; a
    missing term (the ``mean(g_n * x)`` correction) or scale is off by far more than this."""
    gen = torch.Generator().manual_seed(2)
    x64 = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    reference = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    gx_ref, gw_ref = torch.autograd.grad(reference, (x64, w64), grad)
    x, w = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    gx, gw = torch.autograd.grad(_RmsNorm.apply(x, w, 1e-5, None), (x, w), grad.float())
    assert torch.allclose(gx.double(), gx_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gw.double(), gw_ref, rtol=1e-4, atol=1e-5)


def test_without_gradients_the_norm_runs_its_own_forward():
    norm = _norm(torch.float32, False)
    fuse_rms_norms(norm)
    x = torch.randn(2, 48, requires_grad=True)
    with torch.no_grad():
        assert norm(x).grad_fn is None
    assert type(norm(x).grad_fn).__name__ == "_RmsNormBackward"


@pytest.mark.parametrize(("precision", "exact", "routed"), [
    ("bf16", False, True), ("fp32", False, False), ("fp32", True, False)])
def test_placement_routes_the_norms_only_on_the_cpu_bf16_path(precision, exact, routed):
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    applied = place_for_training(model, precision, torch.device("cpu"), exact=exact)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    layers = model.config.num_hidden_layers
    assert len(norms) == 2 * layers + 1
    assert applied.get("fused_rms_norm", 0) == (len(norms) if routed else 0)
    assert all(hasattr(m, "_peftbench_fused_norm_forward") == routed for m in norms)
    assert model.state_dict().keys() == state.keys()


def test_under_bf16_autocast_the_output_is_the_bf16_the_readers_would_cast_to():
    """The fp32-residual norm returns bf16 under CPU bf16 autocast: the same values the
    plain norm's fp32 output gives after autocast's cast, and gradients (x's, the weight's)
    within bf16 rounding of the plain norm's, whose incoming gradient was fp32."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 48, generator=gen) * 4
    grad = torch.randn(3, 7, 48, generator=gen)
    plain, fused = _norm(torch.float32, True), _norm(torch.float32, True)
    fuse_rms_norms(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, gx_plain, gw_plain = _run(plain, x, grad)
        out_fused, gx_fused, gw_fused = _run(fused, x, grad)
    assert out_plain.dtype == torch.float32 and out_fused.dtype == torch.bfloat16
    assert torch.equal(out_fused, out_plain.to(torch.bfloat16))
    assert gx_fused.dtype == torch.float32 and gw_fused.dtype == torch.float32
    for got, want in ((gx_fused, gx_plain), (gw_fused, gw_plain)):
        error = ((got - want).norm() / want.norm()).item()
        assert 0 < error <= 1e-2  # the incoming gradient was rounded to bf16: not equal
