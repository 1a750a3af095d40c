"""Fused fp32 LoRA layers: peft's arithmetic (same dropout draws), less memory kept for the
backward, and peft's own forward wherever the plain case does not apply."""

from __future__ import annotations

import pytest
import torch

from lora_models import tiny_lora_llama
from peftbench.training.dropout import use_fast_dropout
from peftbench.training.fused_lora import fuse_lora_layers

IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12], [7, 3, 60, 2, 19, 25, 4]])


def _lora_model(fused: bool) -> torch.nn.Module:
    model = tiny_lora_llama()
    use_fast_dropout(model)
    if fused:
        assert fuse_lora_layers(model) > 0
    return model


def _loss_and_grads(model: torch.nn.Module, seed: int = 5):
    torch.manual_seed(seed)  # the same dropout draws in both models
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


@pytest.mark.parametrize("train", [True, False])
def test_fused_layers_compute_what_peft_computes(train):
    plain, fused = _lora_model(False).train(train), _lora_model(True).train(train)
    loss_plain, grads_plain = _loss_and_grads(plain)
    loss_fused, grads_fused = _loss_and_grads(fused)
    assert loss_fused == pytest.approx(loss_plain, rel=1e-6)
    assert grads_plain.keys() == grads_fused.keys() and grads_plain
    for name, grad in grads_plain.items():
        # fp32 rounding only: the fused layer folds 1 / (1 - p) into B, peft scales the input
        scale = grad.abs().max().item()
        assert torch.allclose(grads_fused[name], grad, rtol=1e-4, atol=1e-5 * scale), name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradients_of_the_fused_function_match_finite_differences(p):
    """float64 gradcheck of the autograd function itself: bias, a non-contiguous input, and
    dropout off or on (seeded before every evaluation, so every one drops the same
    positions)."""
    from peftbench.training.fused_lora import _LoraLinear

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    def layer(x, bias, a, b):
        torch.manual_seed(3)
        return _LoraLinear.apply(x, weight, bias, a, b, 1.5, p)

    x = leaf(3, 6, 4).transpose(1, 2)  # (3, 4, 6), not contiguous
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)  # frozen
    bias, lora_a, lora_b = leaf(5), leaf(2, 6), leaf(5, 2)
    assert torch.autograd.gradcheck(layer, (x, bias, lora_a, lora_b))


def test_dropout_is_applied_with_the_seeded_positions():
    """With dropout the two models agree only because the masks are the same draws: other
    draws give another loss, so the test above would catch a fused layer without dropout."""
    fused = _lora_model(True)
    first, _ = _loss_and_grads(fused, seed=5)
    fused.zero_grad()
    other, _ = _loss_and_grads(fused, seed=6)
    assert other != first


def _saved_activation_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct non-parameter storages autograd keeps for the backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(5, 100, (8, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def test_fused_layers_keep_less_for_the_backward():
    """peft keeps each adapted layer's dropped input (4 bytes per element); the fused layer
    keeps the shared input once and only the dropped positions (measured on the tiny model,
    both with FastDropout's positions: 6.57 MB against 7.54 MB)."""
    plain = _saved_activation_bytes(_lora_model(False))
    fused = _saved_activation_bytes(_lora_model(True))
    assert fused < 0.9 * plain, (fused, plain)


def test_peft_forward_runs_where_the_plain_case_does_not_apply():
    from peft.tuners.lora import LoraLayer

    model = _lora_model(True).eval()
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)  # every output has a grad_fn

    def computed_by(out: torch.Tensor) -> str:
        return type(out.grad_fn).__name__

    assert computed_by(layer(x)) == "_LoraLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert computed_by(layer(x)) not in ("_LoraLinearBackward", "NoneType")
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.get_base_layer()(x))
    layer.enable_adapters(True)
    layer.get_base_layer().weight.requires_grad_(True)  # a trained base: peft's forward
    assert computed_by(layer(x)) not in ("_LoraLinearBackward", "NoneType")
    layer.get_base_layer().weight.requires_grad_(False)
    layer.merge()
    merged = layer(x)
    assert computed_by(merged) not in ("_LoraLinearBackward", "NoneType")
    assert torch.equal(merged, layer.get_base_layer()(x))


def test_fusing_changes_neither_parameters_nor_the_saved_adapter():
    plain, fused = _lora_model(False), _lora_model(True)
    assert fuse_lora_layers(fused) == fuse_lora_layers(fused)  # idempotent
    assert plain.state_dict().keys() == fused.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], tensor), name
