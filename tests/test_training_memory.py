"""Less memory for the backward, same arithmetic: the gated MLP's SiLU computed again, dropout
bits drawn again, and the widest batch first."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.batches import batch_order, grouped_batches
from peftbench.training.dropout import FastDropout
from peftbench.training.encoding import Encoded
from peftbench.training.model_prep import place_for_training
from peftbench.training.swiglu import GATED_SILU_MLPS, _SiluGate, fuse_silu_gates

IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12], [7, 3, 60, 2, 19, 25, 4]])


def _saved_storages(run) -> dict[int, torch.Tensor]:
    """Distinct storages autograd keeps while ``run()`` builds its graph."""
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


def test_silu_gate_is_bit_identical_to_autograd_and_keeps_two_tensors_not_three():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(4, 7, 12, generator=gen, requires_grad=True)
    up = torch.randn(4, 7, 12, generator=gen, requires_grad=True)
    grad = torch.randn(4, 7, 12, generator=gen)

    def both(fused: bool) -> tuple[torch.Tensor, ...]:
        out = _SiluGate.apply(gate, up) if fused else F.silu(gate) * up
        return (out.detach(), *torch.autograd.grad(out, (gate, up), grad))

    for plain, fused in zip(both(False), both(True), strict=True):
        assert torch.equal(plain, fused)
    assert len(_saved_storages(lambda: F.silu(gate) * up)) == 3
    assert len(_saved_storages(lambda: _SiluGate.apply(gate, up))) == 2


def test_silu_gate_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
    assert torch.autograd.gradcheck(_SiluGate.apply, (gate, up))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_mlps_train_the_same_model(method):
    """The whole model: loss and every gradient bit for bit as before, on fewer saved bytes."""
    def build() -> torch.nn.Module:
        loaded = load_model("tiny-random-llama", seed=0)
        chosen = get_method(method)
        torch.manual_seed(0)
        return chosen.apply(loaded.model, chosen.resolve_args({"dropout": 0.0}
                                                              if method == "lora" else {}),
                            encoder_decoder=False).train()

    plain, fused = build(), build()
    layers = sum(type(m).__name__ == "LlamaMLP" for m in fused.modules())
    assert layers and fuse_silu_gates(fused) == layers == fuse_silu_gates(fused)
    results = []
    for model in (plain, fused):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()
                                      if p.requires_grad}))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(results[1][1][name], grad), name

    def saved_bytes(model: torch.nn.Module) -> int:
        storages = _saved_storages(lambda: model(input_ids=IDS, labels=IDS))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(t.untyped_storage().nbytes() for k, t in storages.items() if k not in params)

    assert saved_bytes(fused) < saved_bytes(plain)


def test_only_gated_silu_mlps_of_known_classes_are_fused():
    """Every listed class that this transformers has computes LlamaMLP's expression; an MLP
    with another activation (Gemma's GELU) keeps its forward."""
    import importlib

    from transformers.models.llama.modeling_llama import LlamaMLP

    reference = inspect.getsource(LlamaMLP.forward)
    found = 0
    for name in GATED_SILU_MLPS:
        family = name.removesuffix("MLP").lower()
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        assert inspect.getsource(getattr(module, name).forward) == reference, name
        found += 1
    assert found >= 5

    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    gelu = GemmaMLP(GemmaConfig(hidden_size=8, intermediate_size=16))
    assert fuse_silu_gates(gelu) == 0


def test_placement_fuses_mlps_only_on_the_fast_fp32_path():
    def applied(precision: str, exact: bool) -> int:
        loaded = load_model("tiny-random-llama", seed=0)
        lora = get_method("lora")
        model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
        return place_for_training(model, precision, torch.device("cpu"),
                                  exact=exact).get("silu_gates_recomputed", 0)

    assert applied("fp32", exact=False) > 0
    assert applied("fp32", exact=True) == 0 and applied("bf16", exact=False) == 0


def test_dropout_bits_are_drawn_again_not_kept_and_torch_stream_is_not_moved():
    torch.manual_seed(4)
    x = torch.randn(32, 50, requires_grad=True)
    dropout = FastDropout(0.3).train()
    outputs = []
    kept = _saved_storages(lambda: outputs.append(dropout(x))).values()
    assert not [t for t in kept if t is not None and t.dtype == torch.int16]
    (out,) = outputs
    torch.rand(1000)  # other draws between the forward and the backward
    state = torch.get_rng_state()
    out.backward(torch.ones_like(out))
    assert torch.equal(torch.get_rng_state(), state)  # the redraw used its own generator
    expected = (out.detach() != 0).float() * dropout.scale
    assert torch.equal(x.grad, expected)  # the forward's mask, not a new one


def _encoded(lengths: list[int]) -> list[Encoded]:
    return [Encoded(input_ids=[1] * n, labels=[1] * n) for n in lengths]


def test_the_first_epoch_starts_with_its_widest_batch_and_keeps_its_batches():
    lengths = [(i * 37) % 101 + 3 for i in range(200)]
    examples = _encoded(lengths)
    first = batch_order(examples, 8, epoch=0, seed=3)
    widest = max(max(lengths[i] for i in batch) for batch in first)
    assert max(lengths[i] for i in first[0]) == widest
    assert sorted(map(sorted, first)) == sorted(map(sorted, grouped_batches(examples, 8, 0, 3)))
    assert batch_order(examples, 8, epoch=1, seed=3) == grouped_batches(examples, 8, 1, 3)


def test_scratch_slots_are_reused_and_grow_only_when_needed():
    from peftbench.training.dropout import Scratch

    cpu = torch.device("cpu")
    first = Scratch.take("test_slot", (4, 6), torch.float32, cpu)
    smaller = Scratch.take("test_slot", (2, 3), torch.float32, cpu)
    assert smaller.shape == (2, 3)
    assert smaller.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    bigger = Scratch.take("test_slot", (5, 6), torch.float32, cpu)
    assert bigger.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert Scratch.take("test_slot", (5, 6), torch.int64, cpu).dtype == torch.int64
    other = Scratch.take("test_other_slot", (5, 6), torch.int64, cpu)
    assert other.untyped_storage().data_ptr() != bigger.untyped_storage().data_ptr()


def test_nothing_kept_for_the_backward_lives_in_scratch_memory():
    """Scratch slots are overwritten by the next layer: a kept tensor there would silently
    corrupt gradients. The fused LoRA model with dropout uses the slots and keeps none."""
    from peftbench.training.dropout import Scratch, use_fast_dropout
    from peftbench.training.fused_lora import fuse_lora_layers

    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False).train()
    use_fast_dropout(model)
    assert fuse_lora_layers(model) > 0
    model(input_ids=IDS, labels=IDS).loss.backward()  # the slots take their sizes
    torch.manual_seed(0)
    saved = _saved_storages(lambda: model(input_ids=IDS, labels=IDS).loss.backward())
    scratch = {b.untyped_storage().data_ptr() for b in Scratch._buffers.values()}
    assert {("random_bits", "cpu"), ("lora_dropped", "cpu")} <= {
        (slot, device.type) for slot, device in Scratch._buffers}
    assert not scratch & set(saved)
