"""The compiled CPU kernels: ``silu(gate) * up`` and the RMSNorm, values and gradients
against float64 within one bf16 rounding, their input checks, threads, the build (cached,
flag fallback, no compiler), and the models' gated MLPs and norms using them on the CPU bf16
path only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_models import IDS, tiny_lora_llama
from peftbench.training import compiled_c, cpu_kernels, swiglu
from peftbench.training.fused_rms_norm import _RmsNorm
from peftbench.training.model_prep import place_for_training

BF16 = torch.bfloat16
#: one rounding to bf16 (8 significant bits, round to nearest): relative error <= 2^-8
ROUNDING = 2.0 ** -8

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason="no C compiler: the PyTorch path is used")


def _operands(n: int = 40_000, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, generator=gen) * 4
    gate[:9] = torch.tensor([0.0, -0.0, 1e-30, -90.0, 90.0, -87.5, 88.5, -1.278, 20.0])
    up = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen)
    return gate.to(BF16), up.to(BF16), grad.to(BF16)


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor, slack: torch.Tensor) -> None:
    """``got`` (bf16) is ``want`` rounded once, up to ``slack`` of float32 arithmetic."""
    error = (got.double() - want).abs()
    bound = ROUNDING * want.abs() + slack
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (worst, got[worst].item(), want[worst].item())


@needs_kernel
def test_forward_keeps_eagers_values():
    """``silu(gate)`` rounded to bf16, then the product rounded: eager's two roundings (a
    product rounded once moved SmolLM2's step-1 prompt-tuning gradient from 2.7 % to 6.2 %
    off fp32's), so equal to eager's result up to silu's last float32 bit."""
    gate, up, _ = _operands()
    got = cpu_kernels.silu_mul(gate, up)
    eager = F.silu(gate) * up
    assert got.dtype == BF16 and got.shape == gate.shape
    assert (got == eager).float().mean() >= 0.999
    silu64 = F.silu(gate.double())
    _within_one_rounding(got, silu64.to(BF16).double() * up.double(), 1e-6 * silu64.abs() + 1e-30)


@needs_kernel
def test_backward_is_the_exact_gradient_rounded_once():
    """The gate's gradient rounded once; the up's as the forward multiplied: by silu's bf16
    value."""
    gate, up, grad = _operands(seed=1)
    g, u, d = gate.double(), up.double(), grad.double()
    s = torch.sigmoid(g)
    grad_gate, grad_up = cpu_kernels.silu_mul_backward(grad, gate, up)
    assert grad_gate.dtype == grad_up.dtype == BF16
    silu_bf16 = (g * s).to(BF16).double()
    _within_one_rounding(grad_up, d * silu_bf16, 1e-6 * (d * g * s).abs() + 1e-30)
    # silu'(x) = s (1 + x (1 - s)) crosses zero near x = -1.278: float32's cancellation there
    # is bounded by the terms' size, not the result's
    terms = (d * u * s).abs() * (1 + (g * (1 - s)).abs())
    _within_one_rounding(grad_gate, d * u * s * (1 + g * (1 - s)), 1e-6 * terms + 1e-30)


@needs_kernel
def test_nan_propagates_and_results_do_not_depend_on_threads():
    gate, up, grad = _operands(n=100_003)  # above the parallel threshold, odd length
    gate[5], up[7] = float("nan"), float("nan")
    threads = torch.get_num_threads()
    results = []
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        try:
            results.append((cpu_kernels.silu_mul(gate, up),
                            *cpu_kernels.silu_mul_backward(grad, gate, up)))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    out, grad_gate, grad_up = results[0]
    assert out[5].isnan() and out[7].isnan() and grad_gate[5].isnan() and grad_up[5].isnan()
    assert out[:5].isfinite().all() and out[8:].isfinite().all()


@needs_kernel
@pytest.mark.parametrize("bad", ["float32", "strided", "shape", "cuda-like"])
def test_wrong_tensors_are_refused_with_what_was_given(bad):
    gate, up, _ = _operands(n=64)
    if bad == "float32":
        up = up.float()
    elif bad == "strided":
        up = torch.stack([up, up], 1)[:, 0]
    elif bad == "shape":
        up = up[:32]
    else:
        up = up.to("meta")
    assert not cpu_kernels.gate_accepts(gate, up)
    with pytest.raises(ValueError, match="expected contiguous CPU tensors of shape"):
        cpu_kernels.silu_mul(gate, up)


def _fake_compiler(folder: Path, refuse: str) -> str:
    """A compiler script that fails when its arguments contain ``refuse``, else runs cc;
    each call with ``-o`` (a compile) is logged to ``folder / "calls"``."""
    script = folder / "cc-wrapper"
    script.write_text(f'#!/bin/sh\ncase "$*" in *-o*) echo "$*" >> {folder / "calls"};; esac\n'
                      f'case "$*" in *{refuse}*) echo refused >&2; exit 1;; esac\n'
                      'exec cc "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@needs_kernel
def test_the_build_is_cached_and_falls_back_to_plainer_flags(tmp_path, monkeypatch):
    source = Path(cpu_kernels.__file__).with_suffix(".c")
    first = compiled_c.build_library(source, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert compiled_c.build_library(source, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp and os.listdir(tmp_path) == [first.name]
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, "-fopenmp"))
    other = tmp_path / "other"
    other.mkdir()
    plain = compiled_c.build_library(source, other)
    assert plain.name != first.name and plain.exists()  # without OpenMP: another build
    assert len((tmp_path / "calls").read_text().splitlines()) == 3  # two refused, one built
    failed = sorted(other.glob("*.failed"))
    assert len(failed) == 2 and all("refused" in note.read_text() for note in failed)
    plain.unlink()
    assert compiled_c.build_library(source, other) == plain  # the refused sets not retried
    assert len((tmp_path / "calls").read_text().splitlines()) == 4
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, "-o"))  # now every compile fails
    plain.unlink()
    with pytest.raises(OSError, match=r"no flag set compiles .* messages are in"):
        compiled_c.build_library(source, other)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        compiled_c.build_library(source, tmp_path)


def test_without_a_compiler_the_placement_keeps_transformers_mlp(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_library", lambda: None)
    model = tiny_lora_llama()
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["silu_gate_kernel"] == applied["rms_norm_kernel"] == 0
    assert applied["fused_rms_norm"] > 0
    with torch.autocast("cpu", dtype=BF16):
        model(input_ids=IDS, labels=IDS).loss.backward()  # PyTorch's operations throughout
    assert not any(hasattr(m, swiglu._ORIGINAL_FORWARD) for m in model.modules())


def test_the_environment_switches_the_kernels_off_for_the_process(monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CPU_KERNELS", "0")
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available()
        model = tiny_lora_llama()
        applied = place_for_training(model, "bf16", torch.device("cpu"))
        assert applied["silu_gate_kernel"] == applied["rms_norm_kernel"] == 0
    finally:
        monkeypatch.delenv("PEFTBENCH_CPU_KERNELS")
        cpu_kernels._library.cache_clear()


def _loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=BF16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@needs_kernel
@pytest.mark.parametrize("method_args", [{}, {"target_modules": ["q_proj", "v_proj"]}])
def test_routed_mlps_train_like_transformers_within_bf16_rounding(method_args):
    """LoRA on every linear layer (``down_proj`` needs the product) and on q/v only (the MLP
    frozen): the loss and every adapter gradient as with transformers' MLP, up to bf16."""
    model = tiny_lora_llama({**method_args, "dropout": 0.0})
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    mlps = [m for m in model.modules() if hasattr(m, swiglu._ORIGINAL_FORWARD)]
    assert applied["silu_gate_kernel"] == len(mlps) == model.config.num_hidden_layers
    loss, grads = _loss_and_grads(model)
    traced = []
    hook = mlps[0].down_proj.register_forward_hook(
        lambda _m, args, _o: traced.append(type(args[0].grad_fn).__name__))
    _loss_and_grads(model)
    hook.remove()
    assert traced == ["_CompiledSiluGateBackward"]
    for mlp in mlps:
        mlp.forward = getattr(mlp, swiglu._ORIGINAL_FORWARD)
    plain_loss, plain_grads = _loss_and_grads(model)
    assert abs(loss - plain_loss) <= 1e-2 * abs(plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        error = ((grad - plain_grads[name]).norm() / plain_grads[name].norm()).item()
        assert error <= 3e-2, name


@pytest.mark.parametrize(("precision", "exact"), [("fp32", False), ("fp32", True)])
def test_fp32_placements_do_not_use_the_kernel(precision, exact):
    model = tiny_lora_llama()
    applied = place_for_training(model, precision, torch.device("cpu"), exact=exact)
    assert applied.get("silu_gate_kernel", 0) == 0


def _norm_operands(rows: int = 300, cols: int = 576, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[:, 7] *= 50  # an outlier channel, as SmolLM2 has
    weight = (1 + 0.3 * torch.randn(cols, generator=gen)).to(BF16)
    grad = torch.randn(rows, cols, generator=gen).to(BF16)
    return x, weight, grad


@needs_kernel
def test_rms_norm_is_the_exact_norm_rounded_once_and_its_input_gradient():
    x, weight, grad = _norm_operands()
    out, scale = cpu_kernels.rms_norm(x, weight, 1e-5)
    x64 = x.double().requires_grad_()
    scale64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = weight.double() * x64 * scale64
    assert out.dtype == BF16 and scale.shape == (300, 1) and scale.dtype == torch.float32
    assert torch.allclose(scale.double(), scale64.detach(), rtol=1e-6, atol=0)
    _within_one_rounding(out, want.detach(), 1e-6 * want.detach().abs() + 1e-30)
    (grad_want,) = torch.autograd.grad(want, x64, grad.double())
    grad_x = cpu_kernels.rms_norm_backward(grad, x, weight, scale)
    assert grad_x.dtype == torch.float32
    assert torch.allclose(grad_x.double(), grad_want, rtol=1e-4,
                          atol=1e-5 * grad_want.abs().max().item())


@needs_kernel
def test_the_fused_norm_takes_the_kernel_only_for_float32_input_and_bf16_output(monkeypatch):
    """Under CPU bf16 autocast the fused norm's values and gradients (input, and the weight's
    when it trains) are the PyTorch path's within bf16 rounding; fp32 output, bf16 input
    or the switch off keep the PyTorch path."""
    x, weight, grad = _norm_operands(rows=40)
    weight = weight.float().requires_grad_()

    def run(out_dtype):
        xs = x.clone().requires_grad_()
        out = _RmsNorm.apply(xs, weight, 1e-5, out_dtype)
        compiled = out.grad_fn.compiled
        grads = torch.autograd.grad(out, (xs, weight), grad.to(out.dtype))
        return out, grads, compiled

    out_k, grads_k, compiled = run(BF16)
    assert compiled
    monkeypatch.setattr(cpu_kernels, "rms_norm_enabled", False)
    out_t, grads_t, compiled_off = run(BF16)
    assert not compiled_off
    assert out_k.dtype == out_t.dtype == BF16
    assert (out_k.float() - out_t.float()).abs().max() <= ROUNDING * 2 * out_t.abs().max()
    for got, want in zip(grads_k, grads_t, strict=True):
        assert ((got - want).norm() / want.norm()).item() <= 1e-2
    monkeypatch.setattr(cpu_kernels, "rms_norm_enabled", True)
    assert not run(None)[2] and not cpu_kernels.norm_accepts(x.to(BF16), weight)
    assert not cpu_kernels.norm_accepts(x.t(), weight)
