"""On a CUDA GPU: the same mixed precision as on CPU (frozen matrices stored once in bf16,
trainable parameters and optimizer state in fp32), every method trains and evaluates, and a
run computes what the CPU computes. Skipped where torch sees no GPU (CI); run on one with
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import math

import pytest
import torch

from peftbench.config import RunSpec
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.model_prep import place_for_training
from peftbench.training.runner import execute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

METHODS = ("full", "lora", "ia3", "prompt_tuning", "bitfit")


def _spec(method: str, device: str, task: str = "toy_cls", **extra) -> RunSpec:
    return RunSpec(model="tiny-random-llama", task=task, method=method, train_size=32,
                   max_steps=4, batch_size=8, eval_every=4, max_eval_examples=16,
                   device=device, precision="bf16", **extra)


def test_bf16_placement_on_cuda_keeps_trainable_fp32_and_stores_the_frozen_base_in_bf16():
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
    place_for_training(model, "bf16", torch.device("cuda"), exact=False)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cuda" for p in params.values())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    frozen_matrices = {n: p for n, p in params.items()
                       if not p.requires_grad and p.dim() == 2 and "embed" not in n}
    assert trainable and frozen_matrices
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in frozen_matrices.values()} == {torch.bfloat16}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates_on_cuda(tmp_path, method):
    record = execute(_spec(method, "cuda"), tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["provenance"]["hardware"]["device"] == "cuda"
    assert record["provenance"]["hardware"]["gpu"]
    assert record["run"]["precision"] == "bf16"
    losses = [p["train_loss"] for p in record["curve"] if p["train_loss"] is not None]
    assert losses and all(math.isfinite(x) for x in losses)
    assert record["efficiency"]["peak_gpu_mb"] > 0
    assert record["scores"]["test"]["n"] > 0


@pytest.mark.parametrize(("method", "task"), [("lora", "toy_cls"), ("full", "toy_cls"),
                                              ("lora", "toy_gen")])
def test_a_cuda_run_computes_what_the_cpu_run_computes(tmp_path, method, task):
    """Same seed, data and steps: the training losses agree within bf16 rounding, and
    evaluation (rank classification; batched generation with the KV cache) scores alike."""
    on_gpu = execute(_spec(method, "cuda", task), tmp_path / "gpu")
    on_cpu = execute(_spec(method, "cpu", task), tmp_path / "cpu")
    for record in (on_gpu, on_cpu):
        assert record["status"] == "completed", record["error"]
    gpu_losses = [p["train_loss"] for p in on_gpu["curve"] if p["train_loss"] is not None]
    cpu_losses = [p["train_loss"] for p in on_cpu["curve"] if p["train_loss"] is not None]
    assert gpu_losses == pytest.approx(cpu_losses, rel=0.02)
    primary = on_cpu["scores"]["test"]["primary"]
    assert on_gpu["scores"]["test"][primary] == pytest.approx(
        on_cpu["scores"]["test"][primary], abs=0.13)  # at most two of 16 examples flip
