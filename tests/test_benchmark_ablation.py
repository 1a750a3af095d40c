"""The ablation benchmark's switches: each turns its fast-path part off (the graph no
longer has the part's autograd function) and on again, and a run reports every part the
placement applied; an unknown part is a usage error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lora_models import IDS, graph_nodes, tiny_lora_llama
from peftbench.training import cpu_kernels
from peftbench.training.model_prep import place_for_training

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from ablation import WorkerConfig, main, run, switches

#: each part's autograd function, as it shows in the graph (the fused LoRA layer's is the
#: compiled one where a C compiler is available)
NODES = {"fused_lora": "_LoraLinearKernelBackward" if cpu_kernels.available()
         else "_LoraLinearBf16Backward", "fused_rms_norm": "_RmsNormBackward",
         "recomputed_attention": "_AttentionBackward",
         "silu_gate_kernel": "_CompiledSiluGateBackward", "fused_rotary": "_RotaryBackward"}


def _nodes(model: torch.nn.Module) -> list[str]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return graph_nodes(model(input_ids=IDS, labels=IDS).loss)


def test_each_switch_turns_its_part_off_and_on_again():
    model = tiny_lora_llama()
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    parts = switches()
    compiled = cpu_kernels.available()  # without a C compiler the kernel parts are not applied
    assert set(parts) == {*NODES, "rms_norm_kernel", "lora_kernel", "attention_kernel"}
    needs_compiler = {part for part in parts if "kernel" in part} | {"fused_rotary"}
    expected = {part: compiled or part not in needs_compiler for part in parts}
    expected["attention_kernel"] = cpu_kernels.bf16_dot()  # AVX-512 BF16 only
    assert all(bool(applied[part]) == expected[part] for part in parts)
    for part, switch in parts.items():
        if part not in NODES or not applied[part]:
            continue
        assert NODES[part] in _nodes(model)
        assert switch(model, False) > 0
        names = _nodes(model)
        assert NODES[part] not in names
        assert all(NODES[other] in names for other in NODES if other != part and applied[other])
        switch(model, True)
        assert NODES[part] in _nodes(model)


def _norm_compiled(model: torch.nn.Module) -> bool:
    norm = next(m for m in model.modules() if hasattr(m, "_peftbench_fused_norm_forward"))
    x = torch.randn(2, 3, norm.weight.shape[0], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return norm(x).grad_fn.compiled


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no kernel to switch")
def test_the_norm_kernel_switch_keeps_the_fused_norm_and_changes_its_arithmetic():
    model = tiny_lora_llama()
    place_for_training(model, "bf16", torch.device("cpu"))
    switch = switches()["rms_norm_kernel"]
    assert _norm_compiled(model)
    try:
        switch(model, False)
        assert not _norm_compiled(model) and "_RmsNormBackward" in _nodes(model)
    finally:
        switch(model, True)
    assert _norm_compiled(model)


def test_a_run_alternates_every_applied_part():
    cfg = WorkerConfig(model="tiny-random-llama", task="rotten_tomatoes", method="lora",
                       variant="peftbench", warmup=0, reps=1, steps=15, train_size=64,
                       batch_size=8)
    report = run(cfg, ["fused_rms_norm", "fused_lora", "recomputed_attention"], steps=4,
                 warmup=1)
    assert [row["part"] for row in report["parts"]] == [
        "fused_rms_norm", "fused_lora", "recomputed_attention"]
    for row in report["parts"]:
        assert row["steps_each"] == 2
        assert row["tokens_per_s_on"] > 0 and row["tokens_per_s_off"] > 0
    assert report["skipped"] == {}


def test_a_paired_run_times_the_same_batches_both_ways(monkeypatch):
    """Each batch runs with the part on and off (the switch sees both states once per
    batch, the order alternating), and the ratios come back per part."""
    import ablation

    states: list[bool] = []
    real = ablation.switches

    def recording() -> dict:
        parts = real()
        rms = parts["fused_rms_norm"]

        def switch(model: torch.nn.Module, on: bool) -> int:
            states.append(on)
            return rms(model, on)

        return {**parts, "fused_rms_norm": switch}

    monkeypatch.setattr(ablation, "switches", recording)
    cfg = WorkerConfig(model="tiny-random-llama", task="rotten_tomatoes", method="lora",
                       variant="peftbench", warmup=0, reps=1, steps=15, train_size=64,
                       batch_size=8)
    report = run(cfg, ["fused_rms_norm"], steps=4, warmup=1, pairs=True)
    (row,) = report["parts"]
    assert report["design"] == "paired batches" and row["batches"] == 4
    assert states[:-1] == [True, False, False, True, True, False, False, True, True, False]
    assert states[-1] is True  # left on
    assert row["median_batch_time_ratio_off_over_on"] > 0
    low, high = row["quartiles_batch_time_ratio"]
    assert 0 < low <= row["median_batch_time_ratio_off_over_on"] <= high


def test_an_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--parts", "fused_lora,fused_norm"])
    assert exit_info.value.code == 2
    assert "unknown fused_norm; choose from fused_lora" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no kernel to switch")
def test_the_lora_kernel_switch_keeps_the_fused_layer_with_pytorchs_operations():
    model = tiny_lora_llama()
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["lora_kernel"] == applied["fused_lora"] > 0
    switch = switches()["lora_kernel"]
    layers = _nodes(model).count("_LoraLinearKernelBackward")
    assert layers == applied["fused_lora"]
    try:
        switch(model, False)
        names = _nodes(model)
        assert "_LoraLinearKernelBackward" not in names
        assert names.count("_LoraLinearBf16Backward") == layers
    finally:
        switch(model, True)
    assert _nodes(model).count("_LoraLinearKernelBackward") == layers
