"""The bf16 CPU fast path: FastDropout (same distribution as nn.Dropout, cheaper masks), no fp32
copy of LoRA inputs, the checkpoint mapping released; fp32 mode untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftbench.config import RunSpec
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.dropout import FastDropout, random_int16, use_fast_dropout
from peftbench.training.model_prep import place_for_training


def _sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


def test_random_int16_every_slice_of_a_word_is_uniform():
    """All four 16-bit pieces of each 64-bit draw must be uniform (a [0, 2**63) draw would
    leave the top piece non-negative)."""
    torch.manual_seed(0)
    bits = random_int16(torch.Size([4 * 200_000]), torch.device("cpu")).view(-1, 4)
    for piece in range(4):
        negative = (bits[:, piece] < 0).double().mean().item()
        assert _sigmas(negative, 0.5, bits.shape[0]) < 5, (piece, negative)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(dtype, p):
    torch.manual_seed(1)
    dropout = FastDropout(p).train()
    x = torch.full((1000, 1000), 3.0, dtype=dtype)
    out = dropout(x)
    assert out.dtype == dtype and out.shape == x.shape
    kept = out != 0
    assert _sigmas(1 - kept.double().mean().item(), p, x.numel()) < 5
    assert torch.all(out[kept] == (x[kept].float() * dropout.scale).to(dtype))
    assert abs(dropout.scale * (1 - round(p * 65536) / 65536) - 1) < 1e-12  # unbiased


def test_backward_uses_the_forward_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 300, requires_grad=True)
    out = FastDropout(0.2).train()(x)
    out.backward(torch.ones_like(out))
    expected = (out.detach() != 0).float() * (1 / (1 - round(0.2 * 65536) / 65536))
    assert torch.equal(x.grad, expected)


def test_seeded_masks_repeat_and_successive_masks_differ():
    dropout = FastDropout(0.5).train()
    x = torch.ones(10_000)
    torch.manual_seed(3)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


def test_eval_p0_and_p1_behave_like_nn_dropout():
    x = torch.randn(8, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        FastDropout(1.5)


def test_use_fast_dropout_replaces_lora_dropout_and_keeps_the_state_dict():
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False).train()
    before = set(model.state_dict())
    plain = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert plain  # LoRA's dropout on each adapted layer
    assert use_fast_dropout(model) == len(plain)
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(fast) == len(plain) and all(m.training and m.p == 0.05 for m in fast)
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert set(model.state_dict()) == before


@pytest.mark.parametrize(("precision", "exact", "fast", "fused"),
                         [("bf16", False, True, True), ("fp32", False, True, True),
                          ("fp32", True, False, False)])
def test_only_exact_fp32_keeps_torch_dropout_and_peft_lora(precision, exact, fast, fused):
    from peft.tuners.lora import LoraLayer

    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
    applied = place_for_training(model, precision, torch.device("cpu"), exact=exact)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    assert any(isinstance(m, FastDropout) for m in model.modules()) == fast
    assert applied.get("fast_dropout", 0) == (len(layers) if fast else 0)
    assert applied.get("fused_lora", 0) == (len(layers) if fused else 0)
    assert all(m.cast_input_dtype_enabled == (precision == "fp32") for m in layers)


def test_lora_without_the_fp32_input_copy_computes_the_same_under_autocast():
    """Dropping peft's fp32 copy of the adapter input only removes casts: same outputs."""
    from peftbench.training.precision import lora_inputs_uncast, store_frozen_in_bf16

    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter contribute
            torch.nn.init.normal_(param, std=0.5)
    store_frozen_in_bf16(model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids).logits.float()
        assert lora_inputs_uncast(model) > 0
        uncast = model(input_ids=ids).logits.float()
    scale = reference.abs().max().item()
    assert (uncast - reference).abs().max().item() <= 0.02 * scale


def _mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux only")
def test_bf16_placement_lets_the_memory_mapped_checkpoint_go(tmp_path):
    """fp32 tensors left after the bf16 cast must not keep the checkpoint file mapped (its
    pages, read once by the cast, would stay in the process's RSS)."""
    import gc

    from transformers import AutoModelForCausalLM

    loaded = load_model("tiny-random-llama", seed=0)
    loaded.model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    lora = get_method("lora")
    model = lora.apply(base, lora.resolve_args({}), encoder_decoder=False)
    gc.collect()
    assert _mapped(weights)  # transformers memory-maps safetensors
    place_for_training(model, "bf16", torch.device("cpu"))
    gc.collect()
    assert not _mapped(weights)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compile_trains_the_same_model_and_keeps_the_run_identity(tmp_path):
    """``--compile`` wraps only the training forward: same losses as eager (fp32), same
    run hash (how it runs, not what it computes), and evaluation still works."""
    from peftbench.training.runner import execute

    fields = {"model": "tiny-random-llama", "task": "toy_cls", "method": "lora",
              "train_size": 32, "max_steps": 3, "batch_size": 8, "lr": 1e-2, "eval_every": 3,
              "max_eval_examples": 8, "precision": "fp32", "device": "cpu", "seed": 0,
              "method_args": {"dropout": 0.0}}
    eager = RunSpec(**fields)
    compiled = RunSpec(**fields, compile=True)
    assert compiled.run_hash() == eager.run_hash()
    records = [execute(spec, tmp_path / name) for spec, name in ((eager, "e"), (compiled, "c"))]
    assert all(r["status"] == "completed" for r in records), [r["error"] for r in records]
    assert records[1]["run"]["config"]["compile"] is True
    losses = [[p["train_loss"] for p in r["curve"] if p["train_loss"] is not None]
              for r in records]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compile_runs_the_fast_fp32_path_with_dropout(tmp_path, monkeypatch):
    """``--compile`` with the fast path (FastDropout masks, fused LoRA): the masks' int64 ->
    int16 view broke the compiled graph; under compile they come from ``randint``. Other
    masks than eager, so the losses agree only roughly; they must be finite and learn."""
    from peftbench.training.runner import execute

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    fields = {"model": "tiny-random-llama", "task": "toy_cls", "method": "lora",
              "train_size": 32, "max_steps": 4, "batch_size": 8, "lr": 1e-2, "eval_every": 1,
              "max_eval_examples": 8, "precision": "auto", "device": "cpu", "seed": 0,
              "method_args": {"dropout": 0.3}}
    records = [execute(RunSpec(**fields, compile=flag), tmp_path / str(flag))
               for flag in (False, True)]
    assert all(r["status"] == "completed" for r in records), [r["error"] for r in records]
    assert all(r["run"]["fast_path"].get("fused_lora") for r in records)
    eager, compiled = ([p["train_loss"] for p in r["curve"] if p["train_loss"] is not None]
                       for r in records)
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=0.05) and compiled[-1] < compiled[0]
