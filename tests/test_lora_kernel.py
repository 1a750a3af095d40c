"""The compiled LoRA layer (CPU bf16): output and gradients against float64 with the
kernel's own dropout mask, for every rank path (4, 8, 16 and any other), tail rows and
columns, float32 and bf16 inputs, sizes that run on one thread and on several; the mask's
rate and seeding; results that do not depend on the thread count; and a model trained
through it like through the PyTorch layer."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

from lora_models import IDS, graph_nodes, tiny_lora_llama
from peftbench.training import cpu_kernels, lora_kernel
from peftbench.training.compiled_c import build_library
from peftbench.training.lora_kernel import draw_seed, dropout_mask, lora_linear_kernel
from peftbench.training.model_prep import place_for_training

BF16, F32 = torch.bfloat16, torch.float32

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C compiler: the PyTorch layer is used")


def _layer(m: int, k: int, n: int, r: int, x_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(x_dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(BF16)
    lora_a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).requires_grad_()
    lora_b = (torch.randn(n, r, generator=gen) / math.sqrt(r)).requires_grad_()
    grad = torch.randn(m, n, generator=gen)
    return x, weight, lora_a, lora_b, grad


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


#: above every kernel's threshold for starting threads (cpu_kernels.c: PB_PARALLEL_MIN)
PARALLEL_SHAPE = (517, 200, 300)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, in float64."""
    return t.detach().to(BF16).double()


def _reference(x, weight, lora_a, lora_b, grad, scaling: float, p: float, keep):
    """Output and gradients (x, A, B) in float64 where the layer rounds to bf16 as autocast
    does: A, B, ``hidden = x' A^T`` and ``grad_hidden = scale g B``."""
    rows, g, scale = _bf16(x), _bf16(grad), scaling / (1 - p)
    a, b, w = _bf16(lora_a), _bf16(lora_b), weight.double()
    dropped = rows * keep
    hidden = _bf16(dropped @ a.t())
    grad_hidden = _bf16(scale * g @ b)
    out = rows @ w.t() + scale * hidden @ b.t()
    return (out, g @ w + keep * (grad_hidden @ a), grad_hidden.t() @ dropped,
            scale * g.t() @ hidden)


@pytest.mark.parametrize("r", [4, 8, 16, 5, 33, 64])
@pytest.mark.parametrize(("m", "k", "n"), [(37, 48, 80), (9, 21, 35), PARALLEL_SHAPE])
@pytest.mark.parametrize("x_dtype", [BF16, F32])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_output_and_gradients_are_the_bf16_ones(r, m, k, n, x_dtype, p):
    """Against float64 with the kernel's mask and autocast's bf16 roundings: the output
    within bf16 rounding, the input gradient within bf16 (bf16 input) or better, ``A``'s and
    ``B``'s within float32 sums (and the odd rank entry whose float32 sum rounds to the
    other bf16 neighbour than the float64 one)."""
    x, weight, lora_a, lora_b, grad = _layer(m, k, n, r, x_dtype)
    scaling = 2.0
    torch.manual_seed(11)
    out = lora_linear_kernel(x, weight, None, lora_a, lora_b, scaling, p)
    out.backward(grad)
    torch.manual_seed(11)
    seed = draw_seed() if p else 0
    keep = dropout_mask(m, k, seed, p).double()
    want, want_gx, want_ga, want_gb = _reference(x, weight, lora_a, lora_b, grad, scaling, p,
                                                 keep)

    assert out.dtype == BF16 and out.shape == (m, n)
    assert _relative(out, want) <= 2 * 2.0 ** -8
    assert x.grad.dtype == x_dtype
    assert _relative(x.grad, want_gx) <= (2 * 2.0 ** -8 if x_dtype == BF16 else 2.0 ** -8)
    assert _relative(lora_a.grad, want_ga) <= 1e-4
    assert _relative(lora_b.grad, want_gb) <= 1e-4


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 5, 7), (2, 40, 3)])
def test_one_row_few_columns_and_small_ranks(r, m, k, n):
    """A single row (no row pair), fewer columns than a vector, ranks 1 to 3 (odd ones
    padded with a zero rank entry in the pair layouts)."""
    x, weight, lora_a, lora_b, grad = _layer(m, k, n, r, BF16, seed=r)
    torch.manual_seed(3)
    out = lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.3)
    out.backward(grad)
    torch.manual_seed(3)
    keep = dropout_mask(m, k, draw_seed(), 0.3).double()
    want, want_gx, want_ga, want_gb = _reference(x, weight, lora_a, lora_b, grad, 2.0, 0.3,
                                                 keep)
    assert _relative(out, want) <= 2 * 2.0 ** -8
    assert _relative(x.grad, want_gx) <= 2 * 2.0 ** -8
    assert _relative(lora_a.grad, want_ga) <= 1e-4
    assert _relative(lora_b.grad, want_gb) <= 1e-4


def test_the_adapter_is_rounded_to_bf16_as_under_autocast():
    """The rounding is there: against float32 A and B the gradients are off by bf16's
    rounding (about 2^-9), far more than against the bf16 reference."""
    m, k, n, r = 64, 96, 80, 8
    x, weight, lora_a, lora_b, grad = _layer(m, k, n, r, BF16, seed=5)
    lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.0).backward(grad)
    keep = torch.ones(m, k, dtype=torch.float64)
    *_, want_gb = _reference(x, weight, lora_a, lora_b, grad, 2.0, 0.0, keep)
    exact_b = 2.0 * _bf16(grad).t() @ (_bf16(x) @ lora_a.detach().double().t())
    assert _relative(lora_b.grad, want_gb) <= 1e-5
    assert _relative(lora_b.grad, exact_b) >= 2.0 ** -12


@pytest.mark.parametrize("r", [4, 5, 64])
def test_the_portable_kernels_compute_what_the_bf16_dot_products_do(r, tmp_path, monkeypatch):
    """A build without AVX-512 BF16 (float32 multiply-adds of the same rounded operands)
    against the default one, on a shape with every tail: the same mask, the same values up
    to float32 sums. Rank 4 runs the portable kernels' blocks of four rows, 64 their
    largest arrays."""
    shape = (*PARALLEL_SHAPE[:1], 203, 301)
    results = []
    for library in (cpu_kernels.compiled(), _portable_build(tmp_path)):
        monkeypatch.setattr(cpu_kernels, "compiled", lambda library=library: library)
        x, weight, lora_a, lora_b, grad = _layer(*shape, r, BF16, seed=9)
        torch.manual_seed(4)
        out = lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.1)
        out.backward(grad)
        results.append((out.detach(), x.grad, lora_a.grad, lora_b.grad))
    assert results[1][0].dtype == BF16
    for fast, portable in zip(*results, strict=True):
        assert _relative(fast, portable.double()) <= 1e-4


@pytest.mark.skipif(not cpu_kernels.bf16_dot(), reason="the dropout bits are kept only "
                    "by the AVX-512 BF16 kernels")
def test_the_backward_draws_the_kept_mask_again_when_given_no_bits(monkeypatch):
    """pb_lora_grad_input reads the forward's mask bits, or, given none, draws the same mask
    from the hash: the same gradients to the bit."""
    results = []
    for keep in (True, False):
        monkeypatch.setattr(cpu_kernels, "bf16_dot", lambda keep=keep: keep)
        x, weight, lora_a, lora_b, grad = _layer(*PARALLEL_SHAPE, 8, BF16, seed=3)
        torch.manual_seed(5)
        lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.2).backward(grad)
        results.append((x.grad, lora_a.grad))
    for kept, drawn in zip(*results, strict=True):
        assert torch.equal(kept, drawn)


def _portable_build(folder) -> ctypes.CDLL:
    source = Path(cpu_kernels.__file__).with_suffix(".c")
    library = cpu_kernels.declare(ctypes.CDLL(str(
        build_library(source, folder, defines=("-DPB_NO_DPBF16",)))))
    assert library.pb_has_dpbf16() == 0
    return library


def test_the_mask_drops_at_rate_p_independently_of_position_and_seed():
    m, k, p = 600, 577, 0.05
    masks = [dropout_mask(m, k, seed, p) for seed in (1, 2, 2**40 + 1)]
    count = m * k
    sigma = math.sqrt(count * p * (1 - p))
    for keep in masks:
        dropped = count - int(keep.sum())
        assert abs(dropped - count * p) <= 6 * sigma
        # columns and rows alike: no stripes from the index arithmetic
        per_column = (~keep).float().mean(0)
        assert per_column.std().item() <= 2 * math.sqrt(p * (1 - p) / m)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    # two seeds agree on about (1-p)^2 + p^2 of the elements, as independent masks do
    agree = (masks[0] == masks[1]).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p ** 2)) <= 0.002
    assert bool(dropout_mask(4, 5, 123, 0.0).all())


def test_the_dropout_seed_comes_from_torchs_generator():
    x, weight, lora_a, lora_b, _ = _layer(16, 32, 24, 8, BF16)

    def output(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return lora_linear_kernel(x, weight, None, lora_a, lora_b, 1.0, 0.3).detach()

    assert torch.equal(output(3), output(3))
    assert not torch.equal(output(3), output(4))
    without = lora_linear_kernel(x, weight, None, lora_a, lora_b, 1.0, 0.0).detach()
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    lora_linear_kernel(x, weight, None, lora_a, lora_b, 1.0, 0.0)
    assert torch.equal(torch.rand(1), before)  # p = 0 draws nothing
    assert not torch.equal(output(3), without)


def test_results_do_not_depend_on_the_thread_count_beyond_float32_sums():
    """At a size where every kernel starts threads: per-thread partial sums of A's and B's
    gradients are all added (a kernel that kept one thread's would be far off)."""
    x, weight, lora_a, lora_b, grad = _layer(*PARALLEL_SHAPE, 8, BF16, seed=4)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for t in (x, lora_a, lora_b):
                t.grad = None
            torch.manual_seed(2)
            lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.1).backward(grad)
            results.append((x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for gx, ga, gb in results[1:]:
        assert torch.equal(gx, results[0][0])  # per row: no sum across threads
        assert _relative(ga, results[0][1].double()) <= 1e-5
        assert _relative(gb, results[0][2].double()) <= 1e-5


def test_without_an_input_gradient_the_adapter_gets_the_same_gradients():
    x, weight, lora_a, lora_b, grad = _layer(20, 32, 48, 8, BF16)
    torch.manual_seed(3)
    lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.1).backward(grad)
    with_input = lora_a.grad.clone(), lora_b.grad.clone()
    lora_a.grad = lora_b.grad = x.grad = None
    x.requires_grad_(False)
    torch.manual_seed(3)
    lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.1).backward(grad)
    assert x.grad is None
    assert torch.equal(lora_a.grad, with_input[0]) and torch.equal(lora_b.grad, with_input[1])


def test_the_backward_is_not_differentiable_again():
    """The kernels add into ``g W`` outside autograd, so a second-order gradient through them
    would be silently wrong: it must be refused. The loss is quadratic, so the output
    gradient depends on ``x`` and a graph of the backward would exist without the refusal."""
    x, weight, lora_a, lora_b, _ = _layer(20, 32, 48, 8, BF16)
    out = lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.0)
    (grad_x,) = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
    assert grad_x.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.float().sum().backward()


def test_a_bias_gets_its_gradient():
    x, weight, lora_a, lora_b, grad = _layer(20, 32, 48, 8, BF16)
    bias = torch.randn(48, requires_grad=True)
    out = lora_linear_kernel(x, weight, bias, lora_a, lora_b, 2.0, 0.0)
    rows = x.detach().double()
    want = (rows @ weight.double().t() + bias.detach().double()
            + 2.0 * rows @ lora_a.detach().double().t() @ lora_b.detach().double().t())
    assert _relative(out, want) <= 2 * 2.0 ** -8
    out.backward(grad)
    assert torch.allclose(bias.grad, grad.to(BF16).float().sum(0), rtol=1e-5, atol=1e-4)


def test_accepts_only_what_the_kernels_compute():
    x = torch.randn(4, 8)
    weight = torch.randn(6, 8).to(BF16)
    assert lora_kernel.accepts(x, weight, 0.1, 8)
    assert lora_kernel.accepts(x.to(BF16), weight, 0.0, 8)
    assert not lora_kernel.accepts(x, weight, 1.0, 8)  # everything dropped: the PyTorch layer
    assert not lora_kernel.accepts(x.double(), weight, 0.1, 8)
    assert not lora_kernel.accepts(x, weight.float(), 0.1, 8)
    # the kernels' per-rank arrays have a fixed size: larger ranks keep PyTorch's operations
    assert cpu_kernels.lora_max_rank() == 64
    assert lora_kernel.accepts(x, weight, 0.1, 64) and not lora_kernel.accepts(x, weight, 0.1, 65)


def _loss_and_grads(model: torch.nn.Module, seed: int = 7):
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=BF16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method_args", [{}, {"target_modules": ["q_proj", "v_proj"]}])
def test_a_model_trains_through_it_as_near_fp32_as_through_the_pytorch_layer(method_args,
                                                                             monkeypatch):
    """Without dropout both layers compute the same function: the loss within 1 % of fp32's
    and every adapter gradient at most twice as far from fp32's as the PyTorch bf16 layer's
    (or 3 %); the kernel keeps A's and B's gradients in float32 where the PyTorch layer
    rounds them."""
    args = {**method_args, "dropout": 0.0}
    reference = tiny_lora_llama(args)  # fp32, peft's own layers, no autocast
    reference.zero_grad()
    loss32 = reference(input_ids=IDS, labels=IDS).loss
    loss32.backward()
    grads32 = {n: p.grad.double() for n, p in reference.named_parameters() if p.grad is not None}

    model = tiny_lora_llama(args)
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["lora_kernel"] == applied["fused_lora"] > 0
    loss, grads = _loss_and_grads(model)
    assert graph_nodes(loss).count("_LoraLinearKernelBackward") == applied["fused_lora"]
    monkeypatch.setattr(lora_kernel, "enabled", False)
    plain_loss, plain_grads = _loss_and_grads(model)
    assert "_LoraLinearKernelBackward" not in graph_nodes(plain_loss)
    assert abs(loss.item() - loss32.item()) <= 1e-2 * abs(loss32.item())
    assert grads.keys() == plain_grads.keys() == grads32.keys() and grads
    for name, want in grads32.items():
        kernel, plain = _relative(grads[name], want), _relative(plain_grads[name], want)
        assert kernel <= max(2 * plain, 3e-2), (name, kernel, plain)


def test_dropout_in_a_model_is_seeded_and_off_in_eval():
    model = tiny_lora_llama({"dropout": 0.3})
    place_for_training(model, "bf16", torch.device("cpu"))
    first, again, other = (_loss_and_grads(model, seed)[0].item() for seed in (5, 5, 6))
    assert first == again != other
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        torch.manual_seed(5)
        a = model(input_ids=IDS, labels=IDS).loss.item()
        torch.manual_seed(6)
        assert model(input_ids=IDS, labels=IDS).loss.item() == a


def test_the_layer_refuses_a_rank_above_the_kernels_cap():
    """Called directly (without accepts), a rank of 65 is an error, not a kernel writing past
    its fixed per-rank arrays."""
    x, weight, lora_a, lora_b, _ = _layer(4, 16, 8, 65, BF16)
    with pytest.raises(ValueError, match="rank 65"):
        lora_linear_kernel(x, weight, None, lora_a, lora_b, 2.0, 0.0)


def test_a_rank_above_the_kernels_cap_runs_and_is_recorded_as_pytorch():
    """A rank the kernels' fixed per-rank arrays cannot hold (65 > 64) runs the PyTorch bf16
    layer, and the record does not count it as compiled."""
    model = tiny_lora_llama({"r": 65})
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["fused_lora"] > 0 and applied["lora_kernel"] == 0
    loss, _ = _loss_and_grads(model)
    assert "_LoraLinearKernelBackward" not in graph_nodes(loss)
    assert graph_nodes(loss).count("_LoraLinearBf16Backward") == applied["fused_lora"]


def test_without_the_kernels_the_placement_records_none(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_library", lambda: None)
    model = tiny_lora_llama()
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    assert applied["lora_kernel"] == 0 and applied["fused_lora"] > 0
    loss, _ = _loss_and_grads(model)
    assert "_LoraLinearBf16Backward" in graph_nodes(loss)


@pytest.mark.parametrize("exact", [False, True])
def test_fp32_placements_do_not_use_it(exact):
    model = tiny_lora_llama()
    applied = place_for_training(model, "fp32", torch.device("cpu"), exact=exact)
    assert applied.get("lora_kernel", 0) == 0
    model.zero_grad()
    loss = model(input_ids=IDS, labels=IDS).loss
    assert "_LoraLinearKernelBackward" not in graph_nodes(loss)
