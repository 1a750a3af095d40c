"""The throughput benchmark's gradient check: step 1's gradients of peftbench against the
Trainer's, at the same weights and batch; a gradient computed differently fails it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from throughput_metrics import gradient_check  # noqa: E402


def _gradients(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.0.lora_A": torch.randn(8, 64, generator=gen),
            "layer.0.lora_B": torch.randn(64, 8, generator=gen),
            "layer.1.bias": torch.randn(64, generator=gen) * 1e-3}


def _bf16(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g.bfloat16().float() for n, g in grads.items()}


def test_the_same_gradient_and_bf16_rounding_pass():
    a = _gradients()
    same = gradient_check(a, {n: g.clone() for n, g in a.items()})
    assert same["passed"] and same["rel_error"] == 0 and same["cosine"] == pytest.approx(1)
    rounded = gradient_check(a, _bf16(a))
    assert rounded["passed"] and 0 < rounded["rel_error"] < 2 ** -8


def test_a_tensor_computed_differently_fails_and_is_named():
    a = _gradients()
    wrong = {**a, "layer.0.lora_B": a["layer.0.lora_B"] * 0.9}  # a missing 10 % term
    check = gradient_check(a, wrong)
    assert not check["passed"] and check["worst_tensor"] == "layer.0.lora_B"
    assert check["worst_tensor_rel_error"] == pytest.approx(0.1, rel=1e-6)
    # a small tensor zeroed hides in the whole gradient's norm, not in the worst tensor
    tiny_lost = gradient_check(a, {**a, "layer.1.bias": torch.zeros(64)})
    assert tiny_lost["passed"] and tiny_lost["worst_tensor"] == "layer.1.bias"
    assert tiny_lost["worst_tensor_rel_error"] == pytest.approx(1.0)


def test_the_bound_grows_with_standard_bf16s_own_difference():
    a = _gradients()
    noise = _gradients(seed=1)

    def moved(by: float) -> dict[str, torch.Tensor]:
        scale = by * sum(float(g.square().sum()) for g in a.values()) ** 0.5 / sum(
            float(g.square().sum()) for g in noise.values()) ** 0.5
        return {n: a[n] + scale * noise[n] for n in a}

    c = moved(0.05)
    assert not gradient_check(a, c)["passed"]  # over the fixed 3 %
    with_reference = gradient_check(a, c, reference=moved(0.04))
    assert with_reference["bound"] == pytest.approx(0.08)
    assert with_reference["passed"] and with_reference["reference_rel_error"] == pytest.approx(
        0.04)
    assert not gradient_check(a, c, reference=moved(0.01))["passed"]  # bound stays 3 %


def test_missing_or_non_finite_gradients_fail():
    a = _gradients()
    missing = gradient_check(a, {n: g for n, g in a.items() if n != "layer.1.bias"})
    assert not missing["passed"] and missing["missing_tensors"] == ["layer.1.bias"]
    nan = {**a, "layer.0.lora_A": a["layer.0.lora_A"].clone().fill_(float("nan"))}
    assert not gradient_check(a, nan)["passed"]


@pytest.mark.slow
def test_the_benchmark_reports_a_passing_gradient_check_on_a_tiny_model(tmp_path):
    """End to end on the tiny random Llama: the workers compute step 1's gradients of (a),
    (a') and (c) and the report carries the check (and the loss check's same-masks
    reference)."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), "--model", "tiny-random-llama",
         "--methods", "lora", "--train-size", "32", "--warmup", "1", "--reps", "1",
         "--steps", "1", "--loss-steps", "2", "--precision", "bf16", "--peak-n", "128",
         "--peak-reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check = report["methods"]["lora"]["gradient_check"]
    assert check["passed"], check
    assert check["tensors"] > 0 and not check["missing_tensors"]
    assert check["rel_error"] < check["bound"]
    assert "reference_rel_error" in check and check["loss_peftbench"] > 0
    assert "Gradient check" in proc.stdout + proc.stderr
    # every timed worker measured the peak next to its repetition (--local-peak, the default)
    lora = report["methods"]["lora"]
    assert all(lora["mfu_local"][v] > 0 for v in ("trainer_default", "trainer_tuned",
                                                   "peftbench"))
    rep = lora["runs"]["peftbench"]["reps"][0]
    assert rep["peak_before_gflops"] > 0 and rep["peak_after_gflops"] > 0
    assert "MFU local" in proc.stdout
    # the compiled LoRA layers draw their own dropout masks: the loss check's baseline is
    # the Trainer with those masks (a''), run for the compared steps
    losses = report["methods"]["lora"]["loss_check"]
    fast_path = report["methods"]["lora"]["runs"]["peftbench"]["fast_path"]
    if fast_path.get("lora_kernel"):
        assert losses["baseline"].startswith("a''"), losses
        assert len(losses["losses_masked"]) == 2
        masked_run = report["methods"]["lora"]["runs"]["trainer_masks"]
        assert masked_run["kernel_mask_dropouts"] > 0
        assert "(a'')" in proc.stdout
    else:  # no C compiler: peftbench's masks are not the kernels', and no (a'') runs
        assert losses["baseline"].startswith("a:") and "trainer_masks" not in \
            report["methods"]["lora"]["runs"]
