"""What each part of peftbench's CPU fast path is worth, measured by alternating steps.

Separate runs of one configuration drift by several percent within minutes on a shared
machine, more than one fast-path part is worth. Here one process trains the placed model
(as ``throughput.py``'s peftbench variant places it) and switches one part off and on
between steps, in pairs (on on off off on on ...), so both states see the same drift, the
same data stream and the same heap. Reported per part: tokens/s with it on and off, their
ratio, and the ratio of median per-token step times.

    python benchmarks/ablation.py --model smollm2-135m --method lora --steps 24

Steps of different batches differ in length, and the on and off steps see different
batches; ``--paired`` instead runs each batch's forward and backward both ways (no optimizer
step, the order alternating) and reports the median of the per-batch time ratios (over
pairs of batches run in both orders), which batch lengths do not confound.

Parts (those the placement applied; others are skipped), with what runs when off:
``fused_lora`` (peft's LoRA forward), ``fused_rms_norm`` (transformers' RMSNorm forward),
``recomputed_attention`` (transformers' sdpa), ``silu_gate_kernel`` (transformers' gated
MLP forward), ``rms_norm_kernel`` (the fused RMSNorm's PyTorch operations),
``lora_kernel`` (the fused LoRA layer's PyTorch operations and dropout positions),
``fused_rotary`` (transformers' rotary embedding) and ``attention_kernel`` (the
recomputed attention's probabilities and their gradient by PyTorch's operations). Dropout's
cheap masks and bf16 storage are not switchable: the fused layers need the first, the
second is the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_worker import WorkerConfig, build, prepare_peftbench, reseed, use_threads

_ROUTED = "_ablation_routed_forward"


def routed_switch(original: str) -> Callable[[nn.Module, bool], int]:
    """A switch for modules whose forward was routed with ``original`` kept (see
    ``training/forward_routing.py``): on, the routed forward; off, the original."""

    def switch(model: nn.Module, on: bool) -> int:
        switched = 0
        for module in model.modules():
            if not hasattr(module, original):
                continue
            routed = module.__dict__.setdefault(_ROUTED, module.forward)
            module.forward = routed if on else getattr(module, original)
            switched += 1
        return switched

    return switch


def attention_switch(implementation: str) -> Callable[[nn.Module, bool], int]:
    """A switch between ``implementation`` (on) and transformers' sdpa (off), for the model
    configs that ``place_for_training`` had switched to it (found at the first call)."""
    switched: dict[int, list[Any]] = {}  # id(model) -> its configs

    def switch(model: nn.Module, on: bool) -> int:
        configs = switched.setdefault(id(model), list({
            id(m.config): m.config for m in model.modules()
            if getattr(getattr(m, "config", None), "_attn_implementation", None)
            == implementation}.values()))
        for config in configs:
            config._attn_implementation = implementation if on else "sdpa"
        return len(configs)

    return switch


def flag_switch(module: Any, flag: str) -> Callable[[nn.Module, bool], int]:
    """A switch for a part read from the module-level boolean ``flag`` at every call."""

    def switch(model: nn.Module, on: bool) -> int:
        setattr(module, flag, on)
        return 1

    return switch


def switches() -> dict[str, Callable[[nn.Module, bool], int]]:
    """Every switchable part by its name in the run record's fast path."""
    from peftbench.training import (
        cpu_kernels,
        fused_lora,
        fused_rms_norm,
        fused_rotary,
        lora_kernel,
        recomputed_attention,
        swiglu,
    )

    return {"fused_lora": routed_switch(fused_lora._ORIGINAL_FORWARD),
            "fused_rms_norm": routed_switch(fused_rms_norm._ORIGINAL),
            "silu_gate_kernel": routed_switch(swiglu._ORIGINAL_FORWARD),
            "rms_norm_kernel": flag_switch(cpu_kernels, "rms_norm_enabled"),
            "lora_kernel": flag_switch(lora_kernel, "enabled"),
            "fused_rotary": routed_switch(fused_rotary._ORIGINAL_FORWARD),
            "recomputed_attention": attention_switch(recomputed_attention.IMPLEMENTATION),
            "attention_kernel": flag_switch(recomputed_attention, "kernel_enabled")}


def alternate(part: str, switch: Callable[[nn.Module, bool], int], model: nn.Module,
              step: Callable[[int], int], steps: int, warmup: int,
              first_step: int) -> dict[str, Any]:
    """``steps`` steps with ``part`` on and off in pairs (on on off off ...) after
    ``warmup`` steps with it on; ``step(n)`` runs step ``n`` and returns its tokens."""
    switch(model, True)
    for n in range(first_step, first_step + warmup):
        step(n)
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {True: [], False: []}
    for k in range(steps):
        on = (k // 2) % 2 == 0
        switch(model, on)
        start = time.perf_counter()
        tokens[on].append(step(first_step + warmup + k))
        times[on].append(time.perf_counter() - start)
    switch(model, True)

    def rate(on: bool) -> float:
        return sum(tokens[on]) / sum(times[on])

    def median_per_token(on: bool) -> float:
        return statistics.median(t / n for t, n in zip(times[on], tokens[on], strict=True))

    return {"part": part, "steps_each": len(times[True]),
            "tokens_per_s_on": rate(True), "tokens_per_s_off": rate(False),
            "speedup": rate(True) / rate(False),
            "median_time_ratio_off_over_on": median_per_token(False) / median_per_token(True)}


def paired(part: str, switch: Callable[[nn.Module, bool], int], model: nn.Module,
           pass_on: Callable[[dict[str, Any]], None], next_batch: Callable[[], dict[str, Any]],
           batches: int, warmup: int) -> dict[str, Any]:
    """Each of ``batches`` batches (an even number) through ``pass_on`` (forward and
    backward, no optimizer step) with ``part`` on and with it off, the order alternating,
    after ``warmup`` batches both ways: both states see the same batches, so the ratios are
    not confounded by batch lengths. Whichever state runs second may gain from the first
    (caches); the geometric mean of two consecutive batches' ratios, one of each order,
    cancels that, and the median and quartiles are of those pair means."""
    ratios: list[float] = []
    totals = {True: 0.0, False: 0.0}
    for k in range(warmup + batches):
        batch = next_batch()
        seconds = {}
        for on in ((True, False) if (k - warmup) % 2 else (False, True)):
            switch(model, on)
            start = time.perf_counter()
            pass_on(batch)
            seconds[on] = time.perf_counter() - start
        if k >= warmup:
            ratios.append(seconds[False] / seconds[True])
            for on in totals:
                totals[on] += seconds[on]
    switch(model, True)
    pairs = [math.sqrt(a * b) for a, b in zip(ratios[0::2], ratios[1::2], strict=False)]
    low, _, high = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs * 3)
    return {"part": part, "design": "paired", "batches": batches,
            "median_batch_time_ratio_off_over_on": statistics.median(pairs),
            "quartiles_batch_time_ratio": [low, high],
            "total_time_ratio_off_over_on": totals[False] / totals[True]}


def run(cfg: WorkerConfig, parts: list[str], steps: int, warmup: int,
        pairs: bool = False) -> dict[str, Any]:
    """Build and place the model once, then alternate each applied part in turn: in pairs of
    training steps, or with ``pairs`` the same batches both ways (forward and backward)."""

    from peftbench.training.batches import endless_batches
    from peftbench.training.encoding import collate, to_device
    from peftbench.training.objective import mean_loss
    from peftbench.training.step import build_optimization, train_step

    use_threads(cfg)
    setup = build(cfg)
    spec, model = setup.spec, setup.model
    device, precision, autocast, fast_path, gather = prepare_peftbench(setup)
    opt = build_optimization(model, setup.lr, spec, spec.max_steps)
    batches = endless_batches(setup.train_set, spec.batch_size, spec.seed)
    model.train()

    def one_step(n: int) -> int:
        counted = [0]

        def count(batch: dict[str, Any]) -> None:
            counted[0] += int(batch["attention_mask"].sum())

        reseed(spec.seed, n)
        train_step(model, batches, setup.encoder.pad_id, spec, opt, device, autocast,
                   setup.loaded.is_encoder_decoder, gather, on_batch=count)
        return counted[0]

    def next_batch() -> dict[str, Any]:
        return to_device(collate(next(batches), setup.encoder.pad_id), device)

    def forward_backward(batch: dict[str, Any]) -> None:
        reseed(spec.seed, 0)
        with autocast():
            loss = mean_loss(model, batch, setup.loaded.is_encoder_decoder, gather)
        loss.backward()
        model.zero_grad(set_to_none=True)

    available = switches()
    results, skipped = [], {}
    next_step = 1
    for part in parts:
        if not fast_path.get(part):
            skipped[part] = "not applied by the placement (precision, device or model)"
            continue
        if pairs:
            results.append(paired(part, available[part], model, forward_backward, next_batch,
                                  steps, warmup))
            continue
        results.append(alternate(part, available[part], model, one_step, steps, warmup,
                                 next_step))
        next_step += warmup + steps
    return {"benchmark": "ablation", "model": cfg.model, "method": cfg.method,
            "precision": precision, "fast_path": fast_path, "parts": results,
            "skipped": skipped, "design": "paired batches" if pairs else "alternating steps",
            "steps_each_part": steps, "warmup": warmup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--parts", default="fused_lora,fused_rms_norm,recomputed_attention,"
                        "silu_gate_kernel,rms_norm_kernel,lora_kernel,fused_rotary,"
                        "attention_kernel")
    parser.add_argument("--steps", type=int, default=24,
                        help="alternating steps per part (half on, half off); with --paired, "
                             "batches per part (each run both ways)")
    parser.add_argument("--paired", action="store_true",
                        help="run each batch's forward and backward both ways (order "
                             "alternating, no optimizer step) and report the median "
                             "per-batch time ratio: not confounded by batch lengths")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 4:
        parser.error("--steps must be a positive multiple of 4 (pairs on and off)")
    parts = args.parts.split(",")
    unknown = [part for part in parts if part not in switches()]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(switches())}")
    total = len(parts) * (args.warmup + args.steps)
    cfg = WorkerConfig(model=args.model, task=args.task, method=args.method,
                       variant="peftbench", warmup=0, reps=1, steps=total,
                       batch_size=args.batch_size, train_size=args.train_size,
                       threads=args.threads)
    report = run(cfg, parts, args.steps, args.warmup, pairs=args.paired)
    for row in report["parts"]:
        if args.paired:
            low, high = row["quartiles_batch_time_ratio"]
            print(f"{row['part']:>22}: median per-batch time off/on "
                  f"{row['median_batch_time_ratio_off_over_on']:.3f} (quartiles {low:.3f} / "
                  f"{high:.3f}), total x{row['total_time_ratio_off_over_on']:.3f}, "
                  f"{row['batches']} batches each way")
            continue
        print(f"{row['part']:>22}: {row['tokens_per_s_on']:7.1f} tokens/s on, "
              f"{row['tokens_per_s_off']:7.1f} off, x{row['speedup']:.3f} "
              f"(median per-token time off/on {row['median_time_ratio_off_over_on']:.3f}, "
              f"{row['steps_each']} steps each)")
    for part, why in report["skipped"].items():
        print(f"{part:>22}: skipped, {why}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
