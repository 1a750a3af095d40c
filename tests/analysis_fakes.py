"""Realistic fake run records (the exact keys of ``result.json``), shared by the analysis,
report and recommend tests. No tests here: import ``make_record`` / ``fake_suite``."""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

# trainable parameters, peak memory MB, seconds per optimizer step (SmolLM2-135M-like, CPU)
METHOD_COSTS: dict[str, tuple[int, float, float]] = {
    "full": (134_515_008, 2310.0, 1.00),
    "lora": (460_800, 1420.0, 0.72),
    "ia3": (55_296, 1380.0, 0.66),
    "prompt_tuning": (11_520, 1350.0, 0.61),
    "bitfit": (101_376, 1395.0, 0.64),
}
DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "full": {}, "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "ia3": {"target_modules": "default"}, "prompt_tuning": {"num_virtual_tokens": 20},
    "bitfit": {"exclude": ["lm_head"]}}
DEFAULT_LR = {"full": 5e-5, "lora": 3e-4, "ia3": 3e-3, "prompt_tuning": 3e-2, "bitfit": 1e-3}
TASKS = {"rotten_tomatoes": ("classification", "accuracy"),
         "cola": ("classification", "mcc"),
         "news_headlines": ("generation", "rougeL")}


def curve_scores(start: float, final: float, half_life: float, points: int,
                 samples_per_point: int) -> list[float]:
    """A saturating learning curve: ``start`` at 0 samples, approaching ``final``."""
    return [round(final - (final - start) * 0.5 ** (i * samples_per_point / half_life), 2)
            for i in range(points)]


def make_record(*, model: str = "smollm2-135m", task: str = "rotten_tomatoes",
                method: str = "lora", train_size: int | None = 100, seed: int = 0,
                lr: float | None = None, scores: list[float] | None = None,
                test: float | None = None, samples_per_point: int = 80,
                seconds_per_point: float | None = None, status: str = "completed",
                error: str | None = None, trainable: int | None = None,
                memory_mb: float | None = None, method_args: dict[str, Any] | None = None,
                task_type: str | None = None, metric: str | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """One record as ``training.runner.execute`` writes it."""
    ttype, tmetric = TASKS.get(task, ("classification", "accuracy"))
    task_type, metric = task_type or ttype, metric or tmetric
    cost = METHOD_COSTS.get(method, (1_000_000, 1500.0, 0.8))
    trainable = trainable if trainable is not None else cost[0]
    total = 134_515_008 + (0 if method == "full" else trainable)
    memory_mb = memory_mb if memory_mb is not None else cost[1]
    per_point = seconds_per_point if seconds_per_point is not None else \
        cost[2] * samples_per_point / batch_size
    lr = lr if lr is not None else DEFAULT_LR.get(method, 1e-3)
    args = method_args if method_args is not None else {}
    scores = scores if scores is not None else [50.0, 70.0, 80.0, 82.0]
    steps_per_point = samples_per_point // batch_size
    config = {"model": model, "task": task, "method": method, "method_args": args,
              "train_size": train_size, "seed": seed, "max_steps": None, "epochs": None,
              "lr": lr, "batch_size": batch_size, "grad_accum": 1, "warmup_ratio": 0.06,
              "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_every": None,
              "num_evals": 8, "max_eval_examples": 48,  # the suite's setting, any curve
              "max_source_length": 128, "max_target_length": 24, "precision": "bf16",
              "device": "auto", "data_dir": None}
    run_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    failed = status == "failed"
    curve = [] if failed else [
        {"step": i * steps_per_point, "samples": i * samples_per_point,
         "seconds": round(i * per_point, 3),
         "train_loss": None if i == 0 else round(2.5 / (1 + i), 4), "val_score": s}
        for i, s in enumerate(scores)]
    best_i = max(range(len(scores)), key=lambda i: scores[i]) if curve else 0
    best = scores[best_i] if curve else None
    train_seconds = round((len(scores) - 1) * per_point, 3)
    val = None if failed else {metric: best, "primary": metric, "n": 48}
    test_scores = None if failed else {
        metric: test if test is not None else round(best - 1.0, 2), "primary": metric, "n": 48}
    return {
        "run": {"hash": run_hash, "config": config, "started_at": "2026-05-01T10:00:00+00:00",
                "finished_at": "2026-05-01T10:01:00+00:00", "method_args": {
                    **DEFAULT_ARGS.get(method, {}), **args},
                "gathered_logits": True, "lr": lr,
                "total_steps": (len(scores) - 1) * steps_per_point, "wall_seconds": 60.0},
        "status": status,
        "error": error if error is not None else (None if status == "completed" else
                                                   "RuntimeError: boom"),
        "params": {} if failed else {"trainable": trainable, "total": total,
                                     "trainable_pct": 100.0 * trainable / total},
        "curve": curve,
        "scores": {"val": val, "test": test_scores, "primary": metric,
                   **({} if failed else {"best_step": best_i * steps_per_point})},
        "efficiency": {} if failed else {
            "train_seconds": train_seconds, "eval_seconds": 3.2,
            "tokens_per_second": 8 * 60 * steps_per_point * (len(scores) - 1) / train_seconds
            if train_seconds else None,
            "train_tokens": 8 * 60 * steps_per_point * (len(scores) - 1),
            "peak_rss_mb": memory_mb, "peak_gpu_mb": None, "adapter_bytes": trainable * 2},
        "provenance": {"versions": {"python": "3.11.2", "torch": "2.8.0",
                                    "transformers": "4.56.0", "peft": "0.17.1",
                                    "peftbench": "0.1.0"},
                       "git_sha": "9a602a3", "hardware": {
                           "device": "cpu", "cpu": "Fake CPU @ 2.0GHz", "cpu_count": 2,
                           "torch_threads": 2, "platform": "Linux-6.1-x86_64"},
                       "data_fingerprint": hashlib.sha256(task.encode()).hexdigest(),
                       "model_fingerprint": hashlib.sha256(model.encode()).hexdigest()},
        "task": {"name": task, "type": task_type, "primary_metric": metric,
                 "sizes": {"train": train_size or 8530, "validation": 48, "test": 48},
                 "notes": [], "source": f"archive:{task}"},
        "model": {"name": model, "source": "archive:smollm2-135m", "pretrained": True,
                  "family": "decoder-only"},
    }


# final score and half-life (samples) per method: PEFT slower at low data, closer at high
PROFILE: dict[str, dict[int, tuple[float, float]]] = {
    "full": {100: (78.0, 60.0), 1000: (86.0, 250.0), 10000: (90.0, 1500.0)},
    "lora": {100: (75.0, 140.0), 1000: (85.5, 260.0), 10000: (89.8, 1400.0)},
    "ia3": {100: (72.0, 160.0), 1000: (84.0, 300.0), 10000: (89.0, 1500.0)},
    "prompt_tuning": {100: (64.0, 260.0), 1000: (78.0, 500.0), 10000: (84.0, 2500.0)},
    "bitfit": {100: (74.0, 150.0), 1000: (84.5, 280.0), 10000: (89.3, 1500.0)},
}
START = {"accuracy": 50.0, "mcc": -5.0, "rougeL": 12.0}
SCALE = {"accuracy": lambda x: x, "mcc": lambda x: 2 * (x - 55), "rougeL": lambda x: 0.45 * x}


def fake_suite(tasks: tuple[str, ...] = ("rotten_tomatoes", "news_headlines"),
               methods: tuple[str, ...] = tuple(PROFILE), sizes: tuple[int, ...] = (100, 1000),
               seeds: tuple[int, ...] = (0,), points: int = 6, noise: float = 0.6,
               model: str = "smollm2-135m") -> list[dict[str, Any]]:
    """A grid of plausible records: PEFT converges slower than full at low data."""
    records = []
    for task in tasks:
        metric = TASKS[task][1]
        for size in sizes:
            per_point = max(8, 3 * size // (points - 1)) if size <= 1000 else size // 2
            for seed in seeds:
                for method in methods:
                    final, half = PROFILE[method][min(PROFILE[method], key=lambda s: abs(
                        math.log(s) - math.log(size)))]
                    rng = random.Random(f"{task}-{size}-{seed}-{method}")
                    final = SCALE[metric](final) + rng.gauss(0, noise)
                    scores = curve_scores(START[metric], final, half, points, per_point)
                    scores = [scores[0]] + [round(s + rng.gauss(0, noise / 2), 2)
                                            for s in scores[1:]]
                    records.append(make_record(
                        model=model, task=task, method=method, train_size=size, seed=seed,
                        scores=scores, samples_per_point=per_point,
                        test=round(max(scores) - 0.8 + rng.gauss(0, noise), 2),
                        method_args=DEFAULT_ARGS[method] if method == "lora" else {}))
    return records
