"""Pure helpers of benchmarks/throughput.py: matmul peak, FLOPs formulas, rates, loss check.

Nothing here loads a model or trains; everything takes and returns plain values so the
numbers in the report can be recomputed by hand from the JSON.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

# --------------------------------------------------------------------------- peak


def matmul_peak_gflops(dtype_name: str, n: int = 2048, inner: int = 10, reps: int = 5,
                       threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Best-of-``reps`` GFLOP/s of ``inner`` back-to-back n x n matmuls (2 n^3 FLOPs each),
    on ``device`` (``cuda``: timed between device synchronisations)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: thread pool, oneDNN/cuBLAS kernel selection, caches, clocks
        torch.mm(a, b, out=out)
    sync()
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        times.append(time.perf_counter() - tick)
    flops = 2.0 * n**3 * inner
    return {
        "dtype": dtype_name,
        "device": device,
        "n": n,
        "matmuls_per_rep": inner,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "gflops_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


# --------------------------------------------------------------------------- FLOPs

FLOPS_FORMULA = {
    "tokens": "non-pad tokens (attention_mask sum) of the batches trained on",
    "positions": "P = tokens + num_virtual_tokens per row (prompt tuning runs its soft prompt "
                 "through every layer; 0 for the other methods)",
    "standard": "model FLOPs = 6 * N_total * P for full fine-tuning; "
                "(4 * N_total + 2 * N_trainable) * P for PEFT with a frozen base "
                "(forward 2N, backward activation gradients 2N, weight gradients only for the "
                "trainable parameters 2*N_trainable). N_total counts every parameter once "
                "(tied embeddings once), including the embedding/LM head. Attention-score "
                "FLOPs (about 4*layers*d_model*context per token forward, under 2% here) "
                "are left out, as in the usual 6N approximation.",
    "strict": "required FLOPs: the transformer body (N_body = N_total minus embedding/head "
              "tables) over all P positions, the LM head (N_head = vocab x d_model) only at "
              "the T positions that predict a target token, because the loss needs no logits "
              "elsewhere. Full: 6*N_body*P + 6*N_head*T. PEFT: 4*N_body*P + 4*N_head*T + "
              "2*N_trainable*P. The same formula for every variant, so a trainer that skips "
              "the prompt-position logits gets no credit for skipping them.",
    "mfu_local": "achieved FLOP/s of a repetition divided by its local peak: the higher of the "
                 "bf16 (or fp32) matmul peaks measured in the same worker just before and just "
                 "after it, outside its timed steps (--local-peak); median over repetitions. "
                 "On a machine whose speed drifts over minutes, the table-wide peak was "
                 "measured at another speed than a run far from the table's start or end",
    "mfu": "achieved FLOP/s (FLOPs of a repetition / its wall seconds) divided by the measured "
           "matmul peak (2048x2048 on CPU, 8192x8192 on CUDA, unless --peak-n) on the "
           "benchmark's device in the precision peftbench computes in (peaks.mfu_against: "
           "bf16 where the device has bf16 units, else fp32), for every variant; median over "
           "repetitions",
}


def step_flops(params: dict[str, int], full: bool, positions: int,
               targets: int) -> dict[str, float]:
    """Standard and strict model FLOPs for ``positions`` processed and ``targets`` predicted."""
    n_total, n_train = params["total"], params["trainable"]
    n_body, n_head = params["body"], params["head"]
    if full:
        standard = 6.0 * n_total * positions
        strict = 6.0 * n_body * positions + 6.0 * n_head * targets
    else:
        standard = (4.0 * n_total + 2.0 * n_train) * positions
        strict = 4.0 * n_body * positions + 4.0 * n_head * targets + 2.0 * n_train * positions
    return {"standard": standard, "strict": strict}


# --------------------------------------------------------------------------- rates


def local_peak(rep: dict[str, Any]) -> float | None:
    """A repetition's local peak: the higher of the matmul peaks measured just before and
    just after it in its own worker (either may be missing), or None."""
    measured = [p for p in (rep.get("peak_before_gflops"), rep.get("peak_after_gflops")) if p]
    return max(measured) if measured else None


def rep_stats(run: dict[str, Any], full: bool, peak_gflops: float | None) -> dict[str, Any]:
    """Per-repetition tokens/s and MFU of one worker's run, and their medians."""
    reps = []
    for rep in run["reps"]:
        seconds = rep["seconds"]
        flops = step_flops(run["params"], full, rep["positions"], rep["targets"])
        entry = {
            "seconds": seconds,
            "tokens": rep["tokens"],
            "tokens_per_s": rep["tokens"] / seconds,
            "achieved_gflops": flops["standard"] / seconds / 1e9,
            "achieved_gflops_strict": flops["strict"] / seconds / 1e9,
        }
        if peak_gflops:
            entry["mfu"] = entry["achieved_gflops"] / peak_gflops
            entry["mfu_strict"] = entry["achieved_gflops_strict"] / peak_gflops
        local = local_peak(rep)
        if local:
            entry["local_peak_gflops"] = local
            entry["mfu_local"] = entry["achieved_gflops"] / local
        reps.append(entry)

    def median(key: str) -> float | None:
        values = [r[key] for r in reps if key in r]
        return statistics.median(values) if values else None

    return {
        "reps": reps,
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "mfu_strict": median("mfu_strict"),
        "mfu_local": median("mfu_local"),
        "achieved_gflops": median("achieved_gflops"),
        "spread": (max(r["tokens_per_s"] for r in reps) / min(r["tokens_per_s"] for r in reps)
                   if reps else None),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- loss check


def _usable(losses: list[float] | None, k: int) -> bool:
    """Whether a reference run's losses cover the ``k`` compared steps, all finite."""
    return (losses is not None and k > 0 and len(losses) >= k
            and all(math.isfinite(x) for x in losses[:k]))


def loss_check(trainer: list[float], peftbench: list[float], steps: int = 20,
               rtol: float = 0.03, atol: float = 0.01, reference: list[float] | None = None,
               ref_factor: float = 2.0, masked: list[float] | None = None) -> dict[str, Any]:
    """Compare the first ``steps`` losses of peftbench (c) with the default Trainer (a).

    Fixed tolerance (bf16's): ``|c - a| <= atol + rtol * |a|`` at every step. With ``reference``
    (a'), the default Trainer with standard bf16 autocast in the same order, c may deviate
    from a up to ``ref_factor`` times as much as a' does: per step (``passed_per_step``,
    ``failed_steps``) ``|c - a| <= atol + max(rtol * |a|, ref_factor * |a' - a|)``. Adam's
    first updates are close to sign(gradient), so bf16 rounding of small gradient components
    moves the trajectory by a few percent in the first steps even for standard mixed
    precision, and from then on the two bf16 trajectories and fp32's are different runs:
    their per-step differences are draws of one size, and one draw of c's exceeding twice
    a''s at the same step says nothing about c's arithmetic. ``passed`` therefore asks the
    per-step rule at step 1 only (same weights, so the forward's arithmetic alone) and, over
    all steps, ``mean |c - a| <= atol + max(rtol * mean |a|, ref_factor * mean |a' - a|)``.

    With ``masked`` (a''), the default Trainer whose LoRA dropouts draw peftbench's masks
    (``kernel_masks.py``), c is compared with a'' instead of a, under the same rule: a and
    a' share torch's masks, a'' and c share peftbench's, so each pair differs only in
    arithmetic. The comparison with a is kept as ``vs_trainer_*``. A reference that does not
    cover the compared steps (a failed run) or is not finite is not used, and
    ``references_not_used`` says so.
    """
    k = min(steps, len(trainer), len(peftbench))
    unusable = {name: v for name, v in (("masked", masked), ("reference", reference))
                if v is not None and not _usable(v, k)}
    masked = masked[:k] if _usable(masked, k) else None
    reference = reference if _usable(reference, k) else None
    a, c = trainer[:k], peftbench[:k]
    base, name = (a, "a") if masked is None else (masked, "a''")
    abs_diffs = [abs(x - y) for x, y in zip(base, c, strict=True)]
    mean_diff = sum(abs_diffs) / k if k else None
    rel_diffs = [d / max(abs(x), 1e-12) for d, x in zip(abs_diffs, base, strict=True)]
    fixed = [atol + rtol * abs(x) for x in base]
    finite = all(math.isfinite(v) for v in a + c)  # a usable a'' is finite
    passed_fixed = bool(k) and finite and all(d <= t for d, t in zip(abs_diffs, fixed,
                                                                     strict=True))
    baseline = ("a: Trainer default fp32" if masked is None
                else "a'': Trainer default fp32 with peftbench's LoRA dropout masks")
    out: dict[str, Any] = {
        "steps_compared": k,
        "baseline": baseline,
        "rule": f"|c - {name}| <= {atol} + {rtol} * |{name}| at every step ({baseline}, "
                "c: peftbench)",
        "rtol": rtol,
        "atol": atol,
        "max_abs_diff": max(abs_diffs) if k else None,
        "mean_abs_diff": mean_diff,
        "max_rel_diff": max(rel_diffs) if k else None,
        "first_step_rel_diff": rel_diffs[0] if k else None,
        "passed_fixed_tolerance": passed_fixed,
        "passed": passed_fixed,
        "failed_steps": [t + 1 for t, (d, x) in enumerate(zip(abs_diffs, fixed, strict=True))
                         if not d <= x],
        "losses_trainer": a,
        "losses_peftbench": c,
    }
    if unusable:  # too short (a failed run) or not finite: not used, and said so
        out["references_not_used"] = {name: f"{len(v)} losses, {k} compared, "
                                      f"{'all' if all(map(math.isfinite, v)) else 'not all'}"
                                      " finite" for name, v in unusable.items()}
    if masked is not None:  # then k > 0
        vs_trainer = [abs(x - y) for x, y in zip(a, c, strict=True)]
        out.update({"losses_masked": masked, "vs_trainer_max_abs_diff": max(vs_trainer),
                    "vs_trainer_mean_abs_diff": sum(vs_trainer) / k})
    if reference is not None:
        r = reference[:k]
        ref_diffs = [abs(x - y) for x, y in zip(a, r, strict=True)]
        allowed = [atol + max(rtol * abs(x), ref_factor * d)
                   for x, d in zip(base, ref_diffs, strict=True)]
        failed = [t + 1 for t, (d, x) in enumerate(zip(abs_diffs, allowed, strict=True))
                  if not d <= x]
        mean_ref = sum(ref_diffs) / k
        mean_allowed = atol + max(rtol * sum(abs(x) for x in base) / k, ref_factor * mean_ref)
        out.update({
            "rule": f"step 1: |c - {name}| <= {atol} + max({rtol} * |{name}|, {ref_factor} * "
                    f"|a' - a|); over the {k} steps: mean |c - {name}| <= {atol} + max({rtol} * "
                    f"mean |{name}|, {ref_factor} * mean |a' - a|) ({baseline}; a: Trainer "
                    "default fp32, a': the same with bf16=True; c: peftbench)",
            "ref_factor": ref_factor,
            "reference_max_abs_diff": max(ref_diffs),
            "reference_mean_abs_diff": mean_ref,
            "reference_max_rel_diff": max(d / max(abs(x), 1e-12)
                                          for d, x in zip(ref_diffs, a, strict=True)),
            "reference_first_step_rel_diff": ref_diffs[0] / max(abs(a[0]), 1e-12),
            "mean_abs_diff_allowed": mean_allowed,
            "passed_per_step": finite and not failed,
            "failed_steps": failed,
            "passed": finite and abs_diffs[0] <= allowed[0] and mean_diff <= mean_allowed,
            "losses_reference_bf16": r,
        })
    return out


# --------------------------------------------------------------------------- gradient check


def gradient_check(trainer: dict[str, Any], peftbench: dict[str, Any],
                   reference: dict[str, Any] | None = None, rtol: float = 0.03,
                   ref_factor: float = 2.0) -> dict[str, Any]:
    """Compare step 1's gradient of peftbench (c) with the default Trainer's (a).

    Each argument maps parameter names to gradient tensors, all taken at the same starting
    weights on the same batch with dropout off, so they differ only in arithmetic (no
    trajectory, no dropout masks, no optimizer). The rule, on the whole gradient:
    ``|g_c - g_a| <= rtol * |g_a|``, or with the reference (a', the Trainer under standard
    bf16 autocast) ``|g_c - g_a| <= max(rtol, ref_factor * |g_a' - g_a| / |g_a|) * |g_a|``:
    peftbench may move the gradient from fp32 at most twice as far as standard bf16 mixed
    precision does. The tensor with the largest relative difference is reported too.
    """
    import torch

    missing = sorted(set(trainer) ^ set(peftbench))
    names = [n for n in trainer if n in peftbench]
    a_norm = math.sqrt(sum(float(trainer[n].double().square().sum()) for n in names))

    def relative(other: dict[str, Any]) -> tuple[float, float, dict[str, float]]:
        diff_sq = dot = other_sq = 0.0
        per_tensor: dict[str, float] = {}
        for n in names:
            a, o = trainer[n].double(), other[n].double()
            d = float((o - a).square().sum())
            diff_sq += d
            dot += float((o * a).sum())
            other_sq += float(o.square().sum())
            per_tensor[n] = math.sqrt(d) / max(float(torch.linalg.vector_norm(a)), 1e-30)
        cosine = dot / max(a_norm * math.sqrt(other_sq), 1e-30)
        return math.sqrt(diff_sq) / max(a_norm, 1e-30), cosine, per_tensor

    error, cosine, per_tensor = relative(peftbench)
    worst = max(per_tensor, key=per_tensor.__getitem__) if per_tensor else None
    comparable = (bool(names) and not missing and a_norm > 0 and all(
        bool(torch.isfinite(t).all()) for g in (trainer, peftbench) for t in g.values()))
    out: dict[str, Any] = {
        "rule": f"|g_c - g_a| <= {rtol} * |g_a| (step 1, same weights and batch, dropout off; "
                "a: Trainer default fp32, c: peftbench)",
        "tensors": len(names),
        "missing_tensors": missing,
        "norm_trainer": a_norm,
        "rel_error": error,
        "cosine": cosine,
        "worst_tensor": worst,
        "worst_tensor_rel_error": per_tensor.get(worst) if worst else None,
        "bound": rtol,
        "passed": comparable and error <= rtol,
    }
    if reference is not None and all(n in reference for n in names):
        ref_error, ref_cosine, ref_per_tensor = relative(reference)
        bound = max(rtol, ref_factor * ref_error)
        out.update({
            "rule": f"|g_c - g_a| <= max({rtol}, {ref_factor} * |g_a' - g_a| / |g_a|) * |g_a| "
                    "(step 1, same weights and batch, dropout off; a: Trainer default fp32, "
                    "a': the same under bf16 autocast, c: peftbench)",
            "reference_rel_error": ref_error,
            "reference_cosine": ref_cosine,
            "reference_worst_tensor_rel_error": max(ref_per_tensor.values(), default=None),
            "bound": bound,
            "passed": comparable and error <= bound,
        })
    return out
