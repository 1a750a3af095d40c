"""The throughput benchmark's operator counter (``--profile-ops``): every ATen operator a
step dispatches, forward and backward, with views apart (they launch no kernel)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from throughput_worker import OpCounter


def test_counts_forward_and_backward_operators_and_views_apart():
    weight = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3)
    with OpCounter() as counter:
        for _ in range(2):
            loss = (x @ weight.t()).relu().sum()
            loss.backward()
    summary = counter.summary(steps=2, rows=50)
    ops = dict(summary["top"])
    assert ops["aten.mm"] >= 2  # the forward product and the weight gradient
    assert ops["aten.relu"] == 1 and ops["aten.threshold_backward"] == 1
    assert "aten.t" not in ops and counter.views["aten.t"] >= 2  # views counted apart
    assert summary["ops_per_step"] == sum(counter.counts.values()) / 2
    assert summary["views_per_step"] == sum(counter.views.values()) / 2
    outside = sum(counter.counts.values())
    (x @ weight.t()).sum()  # not counted once exited
    assert sum(counter.counts.values()) == outside
