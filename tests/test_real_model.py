"""A few real training steps of SmolLM2-135M on real data (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from peftbench.config import RunSpec
from peftbench.training.runner import execute

SHARED = Path(os.environ.get("PEFTBENCH_SHARED_DATA")
              or Path(__file__).resolve().parents[1].parent / "shared" / "data")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "cola").is_dir() or not (SHARED / "e2e").is_dir(),
                       reason=f"real CoLA/E2E copies not found under {SHARED}"),
]


def test_smollm2_lora_on_real_cola(tmp_path):
    spec = RunSpec(model="smollm2-135m", task="cola", data_dir=str(SHARED / "cola"),
                   method="lora", train_size=48, max_steps=3, eval_every=3,
                   max_eval_examples=24, batch_size=16)
    record = execute(spec, tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["model"]["pretrained"] is True
    assert record["params"]["total"] == 134_515_008 + record["params"]["trainable"]
    assert [p["step"] for p in record["curve"]] == [0, 3]
    assert math.isfinite(record["curve"][-1]["train_loss"])
    assert set(record["scores"]["test"]) >= {"accuracy", "macro_f1", "mcc"}
    assert record["task"]["sizes"]["train"] == 48


def test_smollm2_bitfit_generates_on_real_e2e(tmp_path):
    spec = RunSpec(model="smollm2-135m", task="e2e_nlg", data_dir=str(SHARED / "e2e"),
                   method="bitfit", train_size=32, max_steps=2, eval_every=2,
                   max_eval_examples=8, batch_size=8, max_target_length=48)
    record = execute(spec, tmp_path)
    assert record["status"] == "completed", record["error"]
    test = record["scores"]["test"]
    assert test["primary"] == "rougeL" and test["n"] == 8
    assert 0 < test["rougeL"] <= 100  # a pretrained model writes related words
