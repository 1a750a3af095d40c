"""Dropout masks drawn as dropped positions: an independent Bernoulli(p) mask, and
FastDropout behaving as ``nn.Dropout`` with it (same distribution, other draws)."""

from __future__ import annotations

import math

import pytest
import torch

from peftbench.training.dropout import FastDropout, drop_positions

CPU = torch.device("cpu")


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_positions_are_an_independent_bernoulli_mask(p):
    count = 400_000
    torch.manual_seed(0)
    positions = drop_positions(count, p, CPU)
    assert positions.dtype == torch.int64
    assert int(positions[0]) >= 0 and int(positions[-1]) < count
    assert bool((positions[1:] > positions[:-1]).all())  # sorted, no repeats
    mask = torch.zeros(count, dtype=torch.bool)
    mask[positions] = True
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(mask.float().mean().item() - p) < 5 * sigma
    # neighbours independent: both dropped with probability p^2
    both = (mask[1:] & mask[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / count)
    # the same seed draws the same mask, another seed another
    torch.manual_seed(0)
    assert torch.equal(drop_positions(count, p, CPU), positions)
    assert not torch.equal(drop_positions(count, p, CPU), positions)


def test_drop_positions_edge_cases():
    assert drop_positions(100, 0.0, CPU).numel() == 0
    assert drop_positions(0, 0.5, CPU).numel() == 0
    assert torch.equal(drop_positions(7, 1.0, CPU), torch.arange(7))
    torch.manual_seed(3)
    small = [drop_positions(3, 0.9, CPU) for _ in range(200)]
    assert all(int(s.max()) < 3 for s in small if s.numel())
    assert abs(sum(s.numel() for s in small) / 600 - 0.9) < 0.05
    tiny = drop_positions(1000, 1e-20, CPU)  # gaps far beyond the range are clipped
    assert tiny.numel() == 0 or (int(tiny.min()) >= 0 and int(tiny.max()) < 1000)


def test_drop_positions_drawn_in_several_rounds_keep_the_distribution(monkeypatch):
    """With no margin, a round falls short about half the time and the next one continues
    from the last position: the mask must still be sorted, unrepeated and at rate p."""
    from peftbench.training import dropout

    monkeypatch.setattr(dropout, "_MARGIN_SIGMAS", 0.0)
    monkeypatch.setattr(dropout, "_MARGIN_EXTRA", 0)
    count, p, total = 5_000, 0.1, 0
    torch.manual_seed(4)
    for _ in range(100):
        positions = drop_positions(count, p, CPU)
        assert bool((positions[1:] > positions[:-1]).all())
        assert int(positions[0]) >= 0 and int(positions[-1]) < count
        total += positions.numel()
    sigma = math.sqrt(p * (1 - p) / (100 * count))
    assert abs(total / (100 * count) - p) < 5 * sigma


def _sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


def test_a_strided_input_is_dropped_at_the_drawn_positions_in_row_major_order():
    """The mask is the list of drawn flat positions, in the input's logical order: a
    transposed input and its gradient are zeroed at the same elements."""
    x = torch.randn(40, 30).t().requires_grad_()  # (30, 40), not contiguous
    torch.manual_seed(7)
    out = FastDropout(0.3).train()(x)
    torch.manual_seed(7)
    keep = torch.ones(x.numel())
    keep[drop_positions(x.numel(), 0.3, x.device)] = 0.0
    keep = keep.view(x.shape)
    assert torch.equal(out, x.detach() * keep * (1 / 0.7))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, keep * (1 / 0.7))


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
    assert torch.all(out[kept] == (x[kept].float() / (1 - p)).to(dtype))  # unbiased


def test_backward_uses_the_forward_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 300, requires_grad=True)
    out = FastDropout(0.2).train()(x)
    out.backward(torch.ones_like(out))
    expected = (out.detach() != 0).float() * (1 / (1 - 0.2))
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
