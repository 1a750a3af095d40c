"""The throughput benchmark's loss check: peftbench's first losses against the Trainer's,
and the same-masks reference (a'') where peftbench's compiled LoRA layers draw their own
dropout masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from kernel_masks import KernelMaskDropout, use_kernel_masks  # noqa: E402
from throughput_metrics import loss_check  # noqa: E402

from peftbench.training import cpu_kernels, lora_kernel  # noqa: E402

TRAINER = [3.0, 2.0, 1.0, 0.5]
BF16 = [3.01, 2.02, 1.01, 0.52]  # a': |a' - a| = 0.01, 0.02, 0.01, 0.02


def test_losses_within_bf16s_own_deviation_pass_and_failed_steps_are_named():
    passing = loss_check(TRAINER, [3.02, 2.0, 1.02, 0.5], reference=BF16)
    assert passing["passed"] and passing["passed_per_step"] and passing["failed_steps"] == []
    failing = loss_check(TRAINER, [3.0, 2.0, 1.3, 0.5], reference=BF16)
    assert not failing["passed"] and failing["failed_steps"] == [3]
    assert failing["mean_abs_diff"] > failing["mean_abs_diff_allowed"]
    assert failing["baseline"].startswith("a:")


def test_one_step_beyond_twice_bf16s_deviation_there_is_reported_but_the_mean_decides():
    """After step 1 the trajectories are different runs: a single step's excursion is a
    per-step failure, not a failed check, while the mean stays within bf16's."""
    check = loss_check(TRAINER, [3.0, 2.0, 1.06, 0.5], reference=BF16)
    assert check["failed_steps"] == [3] and not check["passed_per_step"]
    assert check["passed"]


def test_step_one_must_agree_at_the_same_weights():
    check = loss_check(TRAINER, [3.2, 2.0, 1.0, 0.5], reference=BF16)
    assert check["mean_abs_diff"] <= check["mean_abs_diff_allowed"]
    assert not check["passed"] and check["failed_steps"] == [1]


def test_with_the_masked_reference_peftbench_is_compared_with_it():
    """Other dropout masks move the trajectory: c follows a'' (its masks), not a."""
    masked = [3.0, 2.1, 1.3, 0.7]
    peftbench = [3.01, 2.11, 1.31, 0.71]
    assert not loss_check(TRAINER, peftbench, reference=BF16)["passed"]
    check = loss_check(TRAINER, peftbench, reference=BF16, masked=masked)
    assert check["passed"], check
    assert check["baseline"].startswith("a'':") and check["losses_masked"] == masked
    assert check["max_abs_diff"] == pytest.approx(0.01)
    assert check["vs_trainer_max_abs_diff"] == pytest.approx(0.31)
    # the same rule: c far from a'' fails, whatever a says
    assert not loss_check(TRAINER, TRAINER, reference=BF16, masked=masked)["passed"]


def test_a_masked_reference_shorter_than_the_comparison_is_not_used():
    check = loss_check(TRAINER, TRAINER, reference=BF16, masked=[3.0])
    assert check["passed"] and check["baseline"].startswith("a:")
    assert "masked" in check["references_not_used"]


def test_a_non_finite_reference_is_not_used_and_does_not_fail_peftbench():
    check = loss_check(TRAINER, [3.02, 2.0, 1.02, 0.5], reference=[3.0, float("nan"), 1.0, 0.5])
    assert "reference" in check["references_not_used"]
    assert "losses_reference_bf16" not in check and check["passed_fixed_tolerance"]
    assert check["passed"]


def test_only_peft_lora_dropouts_above_zero_are_replaced():
    class Layer(nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(p)})

    model = nn.Sequential(Layer(0.1), Layer(0.0), nn.Dropout(0.5))
    assert use_kernel_masks(model) == 1
    assert isinstance(model[0].lora_dropout["default"], KernelMaskDropout)
    assert isinstance(model[1].lora_dropout["default"], nn.Dropout)
    assert isinstance(model[2], nn.Dropout)
    with pytest.raises(ValueError, match="outside"):
        KernelMaskDropout(1.0)


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the compiled LoRA kernels")
def test_the_masks_are_the_compiled_layers_masks():
    """With the frozen weight 0 the compiled layer's output is its adapter alone: with the
    same seed, KernelMaskDropout's masked input gives it to bf16 rounding; another seed's
    masks do not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=gen)
    weight = torch.zeros(24, 40, dtype=torch.bfloat16)
    lora_a = torch.randn(4, 40, generator=gen).bfloat16().float()
    lora_b = torch.randn(24, 4, generator=gen).bfloat16().float()
    p, scaling = 0.3, 2.0
    torch.manual_seed(11)
    compiled = lora_kernel.lora_linear_kernel(x.bfloat16(), weight, None, lora_a, lora_b,
                                              scaling, p).double()
    dropout = KernelMaskDropout(p).train()

    def reference(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        dropped = dropout(x.bfloat16().double())
        return scaling * dropped @ lora_a.double().t() @ lora_b.double().t()

    def error(seed: int) -> float:
        expected = reference(seed)
        return float((compiled - expected).norm() / expected.norm())

    assert error(11) < 2e-2
    assert error(12) > 0.2
    dropout.eval()
    assert torch.equal(dropout(x), x)
