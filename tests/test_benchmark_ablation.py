"""The ablation benchmark's switches: each turns its fast-path part off (the graph no
longer has the part's autograd function; the dropout corrections are no longer called) and
on again, and a run reports every part the placement applied; an unknown part is a usage
error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lora_models import IDS, graph_nodes, tiny_lora_llama
from peftbench.training import sparse_dropout
from peftbench.training.model_prep import place_for_training

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from ablation import WorkerConfig, main, run, switches

#: each part's autograd function, as it shows in the graph
NODES = {"fused_lora": "_LoraLinearBf16Backward", "fused_rms_norm": "_RmsNormBackward",
         "recomputed_attention": "_AttentionBackward"}


def _nodes(model: torch.nn.Module) -> list[str]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return graph_nodes(model(input_ids=IDS, labels=IDS).loss)


def test_each_switch_turns_its_part_off_and_on_again():
    model = tiny_lora_llama()
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    parts = switches()
    assert set(parts) == {*NODES, "sparse_dropout"}
    assert all(applied[part] for part in NODES)
    for part in NODES:
        switch = parts[part]
        assert NODES[part] in _nodes(model)
        assert switch(model, False) > 0
        names = _nodes(model)
        assert NODES[part] not in names
        assert all(NODES[other] in names for other in NODES if other != part)
        switch(model, True)
        assert NODES[part] in _nodes(model)


@pytest.mark.skipif(not sparse_dropout.available(), reason="no C compiler")
def test_the_sparse_dropout_switch_stops_and_restarts_the_corrections(monkeypatch):
    monkeypatch.setattr(sparse_dropout, "enabled", True)  # restored whatever happens
    model = tiny_lora_llama({"dropout": 0.1})
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["sparse_dropout"] == applied["fused_lora"] > 0
    calls = []
    original = sparse_dropout.hidden_minus_dropped
    monkeypatch.setattr(sparse_dropout, "hidden_minus_dropped",
                        lambda *args: calls.append(1) or original(*args))
    switch = switches()["sparse_dropout"]
    for on, more in ((False, 0), (True, applied["fused_lora"])):
        before = len(calls)
        assert switch(model, on) == 1
        _nodes(model)
        assert len(calls) - before == more


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


def test_an_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--parts", "fused_lora,fused_norm"])
    assert exit_info.value.code == 2
    assert "unknown fused_norm; choose from fused_lora" in capsys.readouterr().err
