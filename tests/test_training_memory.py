"""Less memory for the backward, same arithmetic: the gated MLP's SiLU computed again, dropout
masks kept as dropped positions, and the widest batch first."""

from __future__ import annotations

import inspect
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lora_models import IDS, greedy_generations, grouped_query_llama, padded_batch
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.batches import batch_order, grouped_batches
from peftbench.training.dropout import FastDropout
from peftbench.training.encoding import Encoded
from peftbench.training.model_prep import place_for_training
from peftbench.training.swiglu import GATED_SILU_MLPS, _SiluGate, fuse_silu_gates


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


def _with_nonzero_lora_b(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA's ``B`` starts at zero, which makes every ``A`` gradient zero whatever the layer's
    input: seeded random ``B`` so that the input kept for the backward shows in ``A``'s
    gradient (the same values in every model built this way)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_mlps_train_the_same_model(method):
    """The whole model: loss and every gradient bit for bit as before, on fewer saved bytes."""
    def build() -> torch.nn.Module:
        loaded = load_model("tiny-random-llama", seed=0)
        chosen = get_method(method)
        torch.manual_seed(0)
        return _with_nonzero_lora_b(chosen.apply(
            loaded.model, chosen.resolve_args({"dropout": 0.0} if method == "lora" else {}),
            encoder_decoder=False).train())

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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_mlp_product_and_norm_outputs_are_notes_not_kept(monkeypatch, method):
    """On the fast path (fused LoRA layers with dropout for LoRA), neither ``silu(gate) * up``
    nor the layers' RMSNorm outputs are kept for the backward (computed again from what is
    kept anyway), and the loss and every gradient are bit for bit those of the same model
    keeping them. The probe's hooks sit outside the notes' and still see every tensor kept."""
    from peftbench.training.saved_notes import Notes

    def train_once(notes: bool) -> tuple[float, dict[str, torch.Tensor], list[int]]:
        loaded = load_model("tiny-random-llama", seed=0)
        chosen = get_method(method)
        torch.manual_seed(0)
        model = _with_nonzero_lora_b(chosen.apply(loaded.model, chosen.resolve_args({}),
                                                  encoder_decoder=False))
        applied = place_for_training(model, "fp32", torch.device("cpu"))
        assert applied["silu_gates_recomputed"] == applied["norm_outputs_recomputed"] == 2
        assert applied["fused_lora"] > 0 if method == "lora" else True
        with monkeypatch.context() as patch:
            if not notes:
                patch.setattr(Notes, "add", lambda *_: None)
            torch.manual_seed(1)
            kept = _saved_storages(lambda: model.train()(**padded_batch()).loss.backward())
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        widths = sorted(t.shape[-1] for k, t in kept.items() if k not in params and t.dim() > 1)
        torch.manual_seed(1)
        loss = model(**padded_batch()).loss
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, widths

    loss, grads, widths = train_once(notes=False)
    loss_noted, grads_noted, widths_noted = train_once(notes=True)
    assert loss_noted == loss
    for name, grad in grads.items():
        assert torch.equal(grads_noted[name], grad), name
    hidden, intermediate, layers = 64, 128, 2
    assert widths.count(intermediate) - widths_noted.count(intermediate) == layers  # product
    # two norm outputs per layer; with frozen embeddings the first layer's input needs no
    # gradient, so LoRA keeps that norm's output (its note would keep the input instead)
    noted_norms = 2 * layers - (method == "lora")
    assert widths.count(hidden) - widths_noted.count(hidden) == noted_norms


def _installed_with_forward_of(reference: type, names: frozenset[str], suffix: str) -> int:
    """How many of the classes ``names`` this transformers has; each must have
    ``reference``'s forward, source for source."""
    import importlib

    source = inspect.getsource(reference.forward)
    found = 0
    for name in names:
        family = name.removesuffix(suffix).lower()
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        assert inspect.getsource(getattr(module, name).forward) == source, name
        found += 1
    return found


def test_only_gated_silu_mlps_of_known_classes_are_fused():
    """Every listed class that this transformers has computes LlamaMLP's expression; an MLP
    with another activation (Gemma's GELU) keeps its forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    assert _installed_with_forward_of(LlamaMLP, GATED_SILU_MLPS, "MLP") >= 5

    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    gelu = GemmaMLP(GemmaConfig(hidden_size=8, intermediate_size=16))
    assert fuse_silu_gates(gelu) == 0


def test_only_norms_computing_llama_rms_norm_are_routed():
    """Every listed norm class that this transformers has computes LlamaRMSNorm's forward;
    Gemma's (``1 + weight``) keeps its own, and a model's final norm has no layer scope."""
    from torch import nn
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peftbench.training.rms_norm import LLAMA_RMS_NORMS, recompute_norm_outputs

    assert _installed_with_forward_of(LlamaRMSNorm, LLAMA_RMS_NORMS, "RMSNorm") >= 5
    assert recompute_norm_outputs(nn.Sequential(LlamaRMSNorm(8))) == 1
    assert recompute_norm_outputs(nn.Sequential(GemmaRMSNorm(8))) == 0
    model = load_model("tiny-random-llama", seed=0).model
    assert recompute_norm_outputs(model) == model.config.num_hidden_layers


def test_placement_applies_the_memory_changes_only_on_the_fast_fp32_path():
    def applied(precision: str, exact: bool) -> list[int]:
        loaded = load_model("tiny-random-llama", seed=0)
        lora = get_method("lora")
        model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
        done = place_for_training(model, precision, torch.device("cpu"), exact=exact)
        return [done.get(key, 0) for key in ("silu_gates_recomputed", "norm_outputs_recomputed",
                                             "lean_attention")]

    assert all(applied("fp32", exact=False))
    assert not any(applied("fp32", exact=True)) and not any(applied("bf16", exact=False))


def test_dropout_keeps_only_its_dropped_positions_and_draws_nothing_in_the_backward():
    torch.manual_seed(4)
    x = torch.randn(200, 50, requires_grad=True)
    dropout = FastDropout(0.3).train()
    outputs = []
    kept = [t for t in _saved_storages(lambda: outputs.append(dropout(x))).values()
            if t is not None]
    (out,) = outputs
    assert len(kept) == 1 and kept[0].dtype == torch.int64  # no mask, no copy of x
    dropped = (out == 0).sum().item()
    assert kept[0].numel() == dropped and 0.25 * x.numel() < dropped < 0.35 * x.numel()
    torch.rand(1000)  # other draws between the forward and the backward
    state = torch.get_rng_state()
    out.backward(torch.ones_like(out))
    assert torch.equal(torch.get_rng_state(), state)
    expected = (out.detach() != 0).float() * (1 / 0.7)
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
    assert {("lora_dropped", "cpu"), ("lora_work", "cpu")} <= {
        (slot, device.type) for slot, device in Scratch._buffers}
    assert not scratch & set(saved)


_HEAP_PROBE = """
import ctypes, json, os
from peftbench.training import heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during > before

def kept(size):  # whether freeing a block at the heap's top leaves the heap as large
    block = libc.malloc(size)
    held = libc.mallinfo2().arena
    libc.free(block)
    return libc.mallinfo2().arena >= held

applied = heap.steady_heap() if os.environ.get("STEADY") else 0
libc.free(libc.malloc(16 * 2**20))  # a freed mapped block: glibc's adaptive threshold rises
print(json.dumps({"applied": applied, "1 MiB": mapped(2**20), "4 MiB": mapped(4 * 2**20),
                  "24 MiB": mapped(24 * 2**20), "64 MiB": mapped(64 * 2**20),
                  "24 MiB kept": kept(24 * 2**20)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_steady_heap_maps_no_block_and_keeps_the_heaps_free_top():
    """glibc's adaptive threshold maps a 24 MiB block after a 16 MiB one was freed; with
    steady_heap no block is mapped, not even 64 MiB, and freeing a block at the heap's top
    leaves the heap as large (a later step reuses those pages without faulting them in
    again). A malloc setting the user made in the environment is left alone."""
    def probe(**env: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True,
                              text=True, check=True, env={**os.environ, **env})
        return json.loads(done.stdout)

    assert probe() == {"applied": 0, "1 MiB": False, "4 MiB": False, "24 MiB": True,
                       "64 MiB": True, "24 MiB kept": True}
    assert probe(STEADY="1") == {"applied": 1, "1 MiB": False, "4 MiB": False,
                                 "24 MiB": False, "64 MiB": False, "24 MiB kept": True}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        assert probe(STEADY="1", **{name: "131072"}) == {
            "applied": 0, "1 MiB": True, "4 MiB": True, "24 MiB": True, "64 MiB": True,
            "24 MiB kept": True}


@pytest.mark.parametrize(("padded", "kv_heads"), [(True, 2), (False, 2), (True, 4)])
def test_lean_attention_keeps_keys_and_mask_once_and_trains_the_same_model(padded, kv_heads):
    """Switched to lean_sdpa, a model gives bit for bit the loss and gradients of
    transformers' sdpa, keeps no key or value repeated per query head and one mask for all
    layers instead of one per layer."""
    from peftbench.training.lean_attention import IMPLEMENTATION, use_lean_attention

    heads, layers = 4, 2
    batch = padded_batch() if padded else {"input_ids": IDS, "labels": IDS}
    results = []
    for lean in (False, True):
        model = grouped_query_llama(kv_heads)
        assert model.config._attn_implementation == "sdpa"
        if lean:
            assert use_lean_attention(model) == 1 == use_lean_attention(model)
            assert model.config._attn_implementation == IMPLEMENTATION
        loss = model(**batch).loss
        loss.backward()
        shapes = [tuple(t.shape) for t in _saved_storages(lambda m=model: m(**batch)).values()]
        results.append((loss.item(), [p.grad for p in model.parameters()], shapes))
    (loss, grads, shapes), (loss_lean, grads_lean, shapes_lean) = results
    assert loss_lean == loss
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_lean, strict=True))
    if not padded:  # no mask: transformers passes the groups to the kernel itself
        assert sorted(shapes_lean) == sorted(shapes)
        return
    length = IDS.shape[1]
    masks = [s for s in shapes if s[1:] == (1, length, length)]
    masks_lean = [s for s in shapes_lean if s[1:] == (1, length, length)]
    assert (len(masks), len(masks_lean)) == (layers, 1)
    per_query_head = [s for s in shapes if len(s) == 4 and s[1] == heads]
    per_query_head_lean = [s for s in shapes_lean if len(s) == 4 and s[1] == heads]
    if kv_heads == heads:
        assert len(per_query_head) == len(per_query_head_lean)
        return
    assert per_query_head and len(per_query_head) == 3 * len(per_query_head_lean)  # q, k, v
    assert not [s for s in shapes if len(s) == 4 and s[1] == kv_heads]
    assert len([s for s in shapes_lean if len(s) == 4 and s[1] == kv_heads]) == 2 * len(
        per_query_head_lean)  # k and v once per key/value head, beside q


def test_a_model_refusing_lean_attention_keeps_its_own(monkeypatch):
    from transformers import PreTrainedModel

    from peftbench.training.lean_attention import use_lean_attention

    def refuse(self, implementation):
        raise ValueError(f"{implementation} is not supported")

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    model = grouped_query_llama(kv_heads=2)
    assert use_lean_attention(model) == 0
    assert model.config._attn_implementation == "sdpa"


def test_lean_attention_generates_what_sdpa_generates():
    """Generation steps (one query against the cache) are handed to transformers' own sdpa."""
    from peftbench.training.lean_attention import use_lean_attention

    assert torch.equal(*greedy_generations(use_lean_attention))
