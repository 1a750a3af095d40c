"""Fused bf16 LoRA layers (CPU autocast): the adapter's function with its dropout mask
applied consistently in forward and backward, as close to fp32 as peft under autocast, one
shared bf16 copy of a shared input (the dropout masks themselves: ``test_dropout.py``). These
pin the PyTorch layer, so the compiled kernels are switched off here; they have
``test_lora_kernel.py``."""

from __future__ import annotations

import pytest
import torch

from lora_models import graph_nodes, tiny_lora_llama
from peftbench.training import lora_kernel
from peftbench.training.dropout import drop_positions, use_fast_dropout
from peftbench.training.fused_lora import fuse_lora_layers
from peftbench.training.fused_lora_bf16 import lora_linear_bf16, shared_bf16_copy
from peftbench.training.precision import lora_inputs_uncast, store_frozen_in_bf16

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12], [7, 3, 60, 2, 19, 25, 4]])


@pytest.fixture(autouse=True)
def _pytorch_layers(monkeypatch):
    monkeypatch.setattr(lora_kernel, "enabled", False)


def test_a_shared_input_is_copied_to_bf16_once_until_it_changes():
    x = torch.randn(4, 8)
    first = shared_bf16_copy(x)
    assert first.dtype == torch.bfloat16 and shared_bf16_copy(x) is first
    x.add_(1.0)  # a new version: a new copy
    again = shared_bf16_copy(x)
    assert again is not first and torch.equal(again, x.to(torch.bfloat16))
    already = torch.randn(3, dtype=torch.bfloat16)
    assert shared_bf16_copy(already) is already
    with torch.inference_mode():  # inference tensors have no version: copied each time
        frozen = torch.randn(4, 8)
        assert torch.equal(shared_bf16_copy(frozen), frozen.to(torch.bfloat16))
    plain = torch.randn(4, 8)
    with torch.inference_mode():  # a copy made here could not be saved for a backward
        shared_bf16_copy(plain)
    assert not shared_bf16_copy(plain).is_inference()


def test_a_non_contiguous_input_gets_the_same_mask_in_forward_and_backward():
    """A transposed input (strided bf16 copy): dropout must index it in row-major order."""
    base = torch.randn(16, 8)
    x = base.t().requires_grad_()  # (8, 16), not contiguous
    weight = torch.randn(4, 16).to(torch.bfloat16)
    lora_a = torch.randn(2, 16, requires_grad=True)
    lora_b = torch.randn(4, 2, requires_grad=True)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear_bf16(x, weight, None, lora_a, lora_b, 1.0, 0.3)
    out.float().sum().backward()
    torch.manual_seed(2)
    keep = torch.ones(x.numel())
    keep[drop_positions(x.numel(), 0.3, CPU)] = 0.0
    keep = keep.view(x.shape) / 0.7
    xd = x.detach()
    ref = xd @ weight.float().t() + ((xd * keep) @ lora_a.detach().t()) @ lora_b.detach().t()
    assert (out.float() - ref).norm() <= 0.02 * ref.norm()
    ref_grad_a = ((torch.ones_like(ref) @ lora_b.detach()).t() @ (xd * keep))
    assert (lora_a.grad - ref_grad_a).norm() <= 0.02 * ref_grad_a.norm()


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_fused_function_applies_one_mask_in_forward_and_backward(with_bias):
    """Output and every gradient against the formula in float64, with the dropped positions
    the function drew (drawn again from the same seed): a mask missing from any gradient, a
    wrong scale or a wrong transpose fails."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    x = rand(2, 5, 16).requires_grad_()
    weight = rand(12, 16, scale=0.3).to(torch.bfloat16)
    bias = rand(12).requires_grad_() if with_bias else None
    lora_a = rand(4, 16, scale=0.3).requires_grad_()
    lora_b = rand(12, 4, scale=0.3).requires_grad_()
    scaling, p = 2.0, 0.3
    grad_out = rand(2, 5, 12)

    torch.manual_seed(11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear_bf16(x, weight, bias, lora_a, lora_b, scaling, p)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.to(torch.bfloat16))
    torch.manual_seed(11)
    positions = drop_positions(x.numel(), p, CPU)
    assert 0 < positions.numel() < x.numel()

    keep = torch.ones(x.numel(), dtype=torch.float64)
    keep[positions] = 0.0
    keep = keep.view(x.shape) / (1 - p)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    rx, ra, rb = leaves
    ref = rx @ weight.double().t() + ((rx * keep) @ ra.t()) @ rb.t() * scaling
    if with_bias:
        rbias = bias.detach().double().requires_grad_()
        ref = ref + rbias
        leaves.append(rbias)
    ref.backward(grad_out.double())

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return (got.double() - want).norm().item() <= 0.02 * want.norm().item()

    assert close(out, ref.detach())
    assert close(x.grad, rx.grad) and x.grad.dtype == torch.float32
    assert close(lora_a.grad, ra.grad) and close(lora_b.grad, rb.grad)
    if with_bias:
        assert close(bias.grad, rbias.grad) and bias.grad.dtype == torch.float32


def _lora_model(fused: bool, dtype_fp32: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    model = tiny_lora_llama({"dropout": dropout})
    if dtype_fp32:
        return model
    store_frozen_in_bf16(model)
    lora_inputs_uncast(model)
    use_fast_dropout(model)
    if fused:
        assert fuse_lora_layers(model) > 0
    return model


def _loss_and_grads(model: torch.nn.Module, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_layers_are_as_close_to_fp32_as_peft_under_autocast():
    """Dropout off, so all three compute the same function: the fused layers' loss and
    gradients sit within bf16 rounding of fp32, as near as peft's own autocast forward."""
    loss32, grads32 = _loss_and_grads(_lora_model(False, dtype_fp32=True), autocast=False)
    _, grads_peft = _loss_and_grads(_lora_model(False), autocast=True)
    loss_fused, grads_fused = _loss_and_grads(_lora_model(True), autocast=True)
    assert grads32.keys() == grads_fused.keys() == grads_peft.keys() and grads32

    def distance(grads: dict) -> float:
        return max(((grads[n] - g).norm() / g.norm()).item() for n, g in grads32.items())

    assert abs(loss_fused - loss32) <= 0.01 * abs(loss32)
    assert distance(grads_fused) <= max(2 * distance(grads_peft), 0.02)
    assert distance(grads_fused) < 0.1


def test_every_adapted_layer_runs_fused_with_its_dropout():
    from peft.tuners.lora import LoraLayer

    model = _lora_model(True, dropout=0.3)
    layers = sum(isinstance(m, LoraLayer) for m in model.modules())

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=IDS, labels=IDS).loss

    first = loss(5)
    assert graph_nodes(first).count("_LoraLinearBf16Backward") == layers > 0
    assert loss(5).item() == first.item() != loss(6).item()  # seeded, and really dropping
    model.eval()
    assert loss(5).item() == loss(6).item()  # no dropout in eval
