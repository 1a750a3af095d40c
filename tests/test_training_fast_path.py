"""The CPU fast path: FastDropout in place of nn.Dropout (its masks: ``test_dropout.py``), no
fp32 copy of LoRA inputs, the checkpoint mapping released; exact fp32 mode untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftbench.config import RunSpec
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.dropout import FastDropout, use_fast_dropout
from peftbench.training.model_prep import place_for_training


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
    """``--compile`` with the fast path (FastDropout, fused LoRA layers): under compile the
    layers run peft's forward and dropout is torch's, whose masks the compiler draws. Other
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
