"""LoRA dropout without a dropped copy: the compiled corrections against dense products in
float64, their input checks, the build (cached, and a missing compiler falls back), and the
fused layer computing the same function on both paths."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from lora_models import IDS, tiny_lora_llama
from peftbench.training import sparse_dropout
from peftbench.training.dropout import drop_positions
from peftbench.training.model_prep import place_for_training

CPU = torch.device("cpu")
BF16 = torch.bfloat16

needs_compiler = pytest.mark.skipif(not sparse_dropout.available(),
                                    reason="no C compiler: the zeroing path is used")


def _operands(tokens: int = 37, cols: int = 24, r: int = 4, p: float = 0.2):
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(tokens, cols, generator=gen).to(BF16)
    lora_a = torch.randn(r, cols, generator=gen).to(BF16)
    grad_hidden = torch.randn(tokens, r, generator=gen).to(BF16)
    torch.manual_seed(4)
    positions = drop_positions(tokens * cols, p, CPU)
    positions = torch.cat([torch.tensor([0]), positions[positions > 0]])  # the first element
    mask = torch.ones(tokens * cols, dtype=torch.float64)
    mask[positions] = 0.0
    # rows 5-7 keep everything: the C code must step over rows without drops
    keep_rows = (positions // cols >= 5) & (positions // cols <= 7)
    positions = positions[~keep_rows]
    mask.view(tokens, cols)[5:8] = 1.0
    return rows, lora_a, grad_hidden, positions, mask.view(tokens, cols)


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float = 0.01) -> bool:
    return (got.double() - want).norm().item() <= tolerance * want.norm().item()


@needs_compiler
def test_the_forward_correction_equals_the_product_of_the_dropped_input():
    rows, lora_a, _, positions, mask = _operands()
    hidden = sparse_dropout.hidden_minus_dropped(rows @ lora_a.t(), rows, lora_a, positions)
    want = (rows.double() * mask) @ lora_a.double().t()
    assert hidden.dtype == BF16 and _close(hidden, want)
    assert not _close(rows @ lora_a.t(), want, 0.05)  # the correction is not negligible


@needs_compiler
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
def test_the_backward_corrections_equal_the_gradients_under_dropout(x_dtype):
    rows, lora_a, grad_hidden, positions, mask = _operands()
    grad_a = (grad_hidden.t() @ rows).float()
    base = torch.randn(rows.shape, generator=torch.Generator().manual_seed(5))
    grad_x = (base + grad_hidden.float() @ lora_a.float()).to(x_dtype)
    sparse_dropout.backward_minus_dropped(grad_a, grad_x, grad_hidden, rows, lora_a, positions)
    want_a = grad_hidden.double().t() @ (rows.double() * mask)
    want_x = base.double() + (grad_hidden.double() @ lora_a.double()) * mask
    assert _close(grad_a, want_a) and _close(grad_x, want_x)
    assert grad_x.dtype == x_dtype and grad_a.dtype == torch.float32
    # either output alone
    only_a = (grad_hidden.t() @ rows).float()
    sparse_dropout.backward_minus_dropped(only_a, None, grad_hidden, rows, lora_a, positions)
    assert torch.equal(only_a, grad_a)


@needs_compiler
def test_a_dropped_outlier_leaves_no_rounding_error_behind():
    """One element 1000x the others, dropped: the bf16 product of the whole row is
    dominated by it, and subtracting it would leave that product's rounding error behind
    (several percent of the rest). Such a row of hidden, and such a column of grad_A, are
    computed again from the kept elements: as close to float64 as zeroing a copy."""
    rows, lora_a, grad_hidden, positions, mask = _operands(tokens=64, cols=96, r=8, p=0.05)
    row, col = 9, 17
    rows[row, col] = 1000.0
    flat = row * rows.shape[1] + col
    positions = torch.unique(torch.cat([positions, torch.tensor([flat])]))
    mask.view(-1)[flat] = 0.0
    before = sparse_dropout.recomputed

    hidden = sparse_dropout.hidden_minus_dropped(rows @ lora_a.t(), rows, lora_a, positions)
    want = (rows.double() * mask) @ lora_a.double().t()
    zeroed = (rows * mask.to(BF16)) @ lora_a.t()
    error = (hidden[row].double() - want[row]).norm() / want[row].norm()
    error_zeroed = (zeroed[row].double() - want[row]).norm() / want[row].norm()
    assert error <= max(2 * error_zeroed, 0.005)

    grad_a = (grad_hidden.t() @ rows).float()
    sparse_dropout.backward_minus_dropped(grad_a, None, grad_hidden, rows, lora_a, positions)
    want_a = grad_hidden.double().t() @ (rows.double() * mask)
    error_a = (grad_a[:, col].double() - want_a[:, col]).norm() / want_a[:, col].norm()
    assert error_a <= 0.005
    assert sparse_dropout.recomputed - before >= 2  # the row and the column
    # without the recomputation the row would be far off: the check is not idle
    naive = (rows @ lora_a.t()).double()[row] - (rows.double() * (1 - mask))[row] @ \
        lora_a.double().t()
    assert (naive - want[row]).norm() / want[row].norm() > 5 * max(error, 0.001)


@needs_compiler
def test_operands_the_c_code_cannot_take_are_rejected():
    rows, lora_a, _, positions, _ = _operands()
    hidden = rows @ lora_a.t()
    with pytest.raises(ValueError, match=re.escape("in [0, 888)")):
        sparse_dropout.hidden_minus_dropped(hidden, rows, lora_a, positions + rows.numel())
    with pytest.raises(ValueError, match="not contiguous"):
        sparse_dropout.hidden_minus_dropped(hidden, rows.t().contiguous().t(), lora_a,
                                            positions)
    with pytest.raises(ValueError, match=re.escape("torch.bfloat16 tensor of shape (37, 4)")):
        sparse_dropout.hidden_minus_dropped(hidden.float(), rows, lora_a, positions)
    with pytest.raises(ValueError, match="int64"):
        sparse_dropout.hidden_minus_dropped(hidden, rows, lora_a, positions.int())
    descending = positions.flip(0).contiguous()  # the last one in range: only C can tell
    with pytest.raises(ValueError, match="strictly increasing"):
        sparse_dropout.hidden_minus_dropped(hidden, rows, lora_a, descending)
    with pytest.raises(ValueError, match="strictly increasing"):
        sparse_dropout.backward_minus_dropped(None, hidden.new_zeros(rows.shape), hidden,
                                              rows, lora_a, torch.cat([positions[:1],
                                                                       positions[:1]]))


@needs_compiler
def test_the_library_is_built_once_per_source_and_compiler(tmp_path):
    first = sparse_dropout.build_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert sparse_dropout.build_library(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_without_a_compiler_the_layers_zero_copies_instead(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert sparse_dropout._library.__wrapped__() is None
    assert "zeroing copies instead" in caplog.text
    monkeypatch.setattr(sparse_dropout, "_library", lambda: None)
    assert not sparse_dropout.available() and not sparse_dropout.pays(0.05)
    model = tiny_lora_llama({"dropout": 0.1})
    applied = place_for_training(model, "bf16", CPU)
    assert applied["fused_lora"] > 0 and applied["sparse_dropout"] == 0  # recorded
    loss, grads = _loss_and_grads(model, seed=3)
    assert math.isfinite(loss) and all(bool(g.abs().sum() > 0) for g in grads.values())


def test_the_record_counts_only_layers_whose_dropout_the_c_code_applies():
    for dropout in (0.0, sparse_dropout.MAX_P):
        model = tiny_lora_llama({"dropout": dropout})
        applied = place_for_training(model, "bf16", CPU)
        assert applied["fused_lora"] > 0 and applied["sparse_dropout"] == 0


def _loss_and_grads(model: torch.nn.Module, seed: int, autocast: bool = True):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


def _worst(grads: dict, reference: dict) -> float:
    return max(((grads[n].double() - g.double()).norm() / g.double().norm()).item()
               for n, g in reference.items())


@needs_compiler
def test_the_fused_layers_are_as_close_to_fp32_on_both_paths(monkeypatch):
    """The fp32 fused layers draw the same masks from the same seed, so they are the
    reference: the corrected bf16 path's loss and LoRA gradients are as close to it as the
    zeroing path's (the tiny random model amplifies bf16 rounding to several percent; another
    seed's masks move the gradients by more than 100 %). The corrections really ran."""
    reference = tiny_lora_llama({"dropout": 0.15})
    place_for_training(reference, "fp32", CPU)
    loss32, grads32 = _loss_and_grads(reference, seed=7, autocast=False)
    _, grads_other_masks = _loss_and_grads(reference, seed=8, autocast=False)

    model = tiny_lora_llama({"dropout": 0.15})
    applied = place_for_training(model, "bf16", CPU)
    assert applied["sparse_dropout"] == applied["fused_lora"] > 0
    calls = []
    original = sparse_dropout.hidden_minus_dropped
    monkeypatch.setattr(sparse_dropout, "hidden_minus_dropped",
                        lambda *args: calls.append(1) or original(*args))
    loss_sparse, grads_sparse = _loss_and_grads(model, seed=7)
    assert len(calls) == applied["fused_lora"] > 0
    monkeypatch.setattr(sparse_dropout, "enabled", False)
    loss_zeroed, grads_zeroed = _loss_and_grads(model, seed=7)
    assert len(calls) == applied["fused_lora"]  # not called when switched off

    assert abs(loss_sparse - loss32) <= 0.01 * abs(loss32)
    assert abs(loss_zeroed - loss32) <= 0.01 * abs(loss32)
    assert _worst(grads_sparse, grads32) <= max(1.5 * _worst(grads_zeroed, grads32), 0.02)
    assert _worst(grads_sparse, grads32) < 0.15 < 1.0 < _worst(grads_other_masks, grads32)


@needs_compiler
def test_dropout_from_max_p_on_zeroes_copies_instead(monkeypatch):
    assert sparse_dropout.pays(0.05) and not sparse_dropout.pays(0.0)
    assert not sparse_dropout.pays(sparse_dropout.MAX_P)
    model = tiny_lora_llama({"dropout": sparse_dropout.MAX_P})
    place_for_training(model, "bf16", CPU)
    calls = []
    monkeypatch.setattr(sparse_dropout, "hidden_minus_dropped",
                        lambda *args: calls.append(1))
    _loss_and_grads(model, seed=7)
    assert calls == []
