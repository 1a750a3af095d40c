"""Training throughput: Hugging Face Trainer (default, tuned) against peftbench's own loop.

    python benchmarks/throughput.py --model smollm2-135m [--out throughput.json]
    python benchmarks/throughput.py --model tiny-random-llama --steps 3      # quick check
    python benchmarks/throughput.py --profile lora                          # where time goes

For every method it trains the same examples, batches and steps three ways, each in its own
process (so peak RSS is per configuration), and reports tokens/s, the ratios between the
variants, model FLOPs utilisation against this machine's measured matmul peak in the
precision peftbench computes in (bf16 where the CPU has bf16 units, else fp32), peak RSS,
a comparison of the first losses of peftbench with the default Trainer's (step 1 and the mean
over the first steps, within bf16's own deviation; against the Trainer with peftbench's
LoRA dropout masks where peftbench draws its own) and of step 1's gradients (the speed must
not come from computing something else). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_metrics import (
    FLOPS_FORMULA,
    loss_check,
    matmul_peak_gflops,
    ratio,
    rep_stats,
)
from throughput_worker import MASKED, REFERENCE, VARIANTS, WorkerConfig, run_worker

METHODS = ("full", "lora", "ia3", "prompt_tuning", "bitfit")
LABELS = {"trainer_default": "(a) Trainer default", "trainer_tuned": "(b) Trainer tuned",
          "peftbench": "(c) peftbench", REFERENCE: "(a') Trainer default + bf16, loss reference",
          MASKED: "(a'') Trainer default with peftbench's dropout masks, loss reference"}
SHORT = {"trainer_default": "(a) default", "trainer_tuned": "(b) tuned",
         "peftbench": "(c) peftbench"}
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training throughput of peftbench against the Hugging Face Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="peftbench model name")
    p.add_argument("--task", default="rotten_tomatoes",
                   help="peftbench task (e.g. rotten_tomatoes; cola with --data-dir)")
    p.add_argument("--data-dir", default=None, help="task data folder (e.g. ../shared/data/cola)")
    p.add_argument("--train-size", type=int, default=512,
                   help="training examples drawn (rounded down to a multiple of the batch)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method argument for every method that has it, as `peftbench train "
                        "--method-arg` (e.g. target_modules=q_proj,v_proj); repeatable")
    p.add_argument("--compile", action="store_true",
                   help="peftbench variant: torch.compile the training forward (`--compile` "
                        "of peftbench train); compilation happens in the warm-up steps")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where every variant trains and the matmul peak is measured")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the repetitions")
    p.add_argument("--seq-len", type=int, default=None,
                   help="max prompt tokens (peftbench max_source_length; default RunSpec's)")
    p.add_argument("--max-target-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable cores)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="peftbench variant's precision (default: RunSpec's, auto: bf16 where "
                        "the CPU computes it natively, else fp32)")
    p.add_argument("--loss-steps", type=int, default=20, help="losses compared, from step 1")
    p.add_argument("--loss-rtol", type=float, default=0.03)
    p.add_argument("--loss-atol", type=float, default=0.01)
    p.add_argument("--bf16-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run (a') = (a) + bf16=True for the first --loss-steps steps, "
                        "to tell bf16's own effect on the losses from peftbench's")
    p.add_argument("--masked-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run (a'') = (a) with peftbench's LoRA dropout masks for the first "
                        "--loss-steps steps where peftbench's compiled LoRA layers draw their "
                        "own masks, and compare (c) with it instead of (a)")
    p.add_argument("--gradient-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare step 1's gradient (same weights and batch, dropout off) "
                        "of (c) with (a), and of (a') where peftbench computes in bf16")
    p.add_argument("--gradient-rtol", type=float, default=0.03)
    p.add_argument("--peak-n", type=int, default=None,
                   help="matrix size of the peak matmuls (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--local-peak", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU, also measure the matmul peak in every timed worker after "
                        "its warm-up and after each repetition (untimed, about a second "
                        "each) and report "
                        "MFU against each repetition's local peak ('MFU local'): on a machine "
                        "whose speed drifts over minutes, a table-wide peak is a poor "
                        "denominator for a run measured far from it")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--log-dir", default=None, help="keep each worker's output here")
    p.add_argument("--profile", metavar="METHOD", default=None,
                   help="only profile a few steps of METHOD and print the top ops")
    p.add_argument("--profile-variant", choices=VARIANTS, default="peftbench")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--profile-trace", default=None, help="also write a Chrome trace here")
    p.add_argument("--profile-ops", action="store_true",
                   help="with --profile: count the ATen operators a step dispatches (about "
                        "one kernel launch each on a GPU) instead of timing them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def worker_config(args: argparse.Namespace, method: str, variant: str) -> WorkerConfig:
    return WorkerConfig(
        model=args.model, task=args.task, method=method, variant=variant, device=args.device,
        data_dir=str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None,
        train_size=args.train_size, batch_size=args.batch_size,
        warmup=args.warmup, reps=args.reps, steps=args.steps, seed=args.seed,
        threads=args.threads or usable_cores(), precision=args.precision,
        max_source_length=args.seq_len, max_target_length=args.max_target_length,
        loss_steps=args.loss_steps, method_args=method_args_for(method, args.method_arg),
        compile=args.compile and variant == "peftbench",
        rep_peak=local_peak_size(args) if args.local_peak and variant in VARIANTS else None)


def local_peak_size(args: argparse.Namespace) -> dict[str, Any] | None:
    """matmul_peak_gflops's arguments for a worker's local peaks: the table's own (size,
    precision, repetitions), so that a local peak is as much a best-of as the table's; None
    on a GPU, where its matrices would count in the device's peak memory."""
    precision, sizes = compute_precision(args)
    return None if sizes[precision]["device"] != "cpu" else {"dtype_name": precision,
                                                              **sizes[precision]}


def method_args_for(method: str, pairs: list[str]) -> dict[str, Any]:
    """The ``--method-arg`` values that ``method`` accepts (others keep their defaults)."""
    from peftbench.cli import parse_method_args
    from peftbench.methods import get_method

    accepted = get_method(method).defaults
    return {k: v for k, v in parse_method_args(pairs).items() if k in accepted}


def check_method_args(methods: list[str], pairs: list[str]) -> None:
    """Exit 2 before any measuring on an unknown method, a ``--method-arg`` that no chosen
    method has, or a value of the wrong type (not a failed worker later)."""
    from peftbench.cli import parse_method_args
    from peftbench.errors import UsageError
    from peftbench.methods import get_method

    try:
        given = parse_method_args(pairs)
        for key in given:
            if not any(key in get_method(m).defaults for m in methods):
                raise UsageError(f"--method-arg {key}: none of the methods {', '.join(methods)} "
                                 "has this argument (see `peftbench methods`).")
        for method in methods:
            get_method(method).resolve_args(method_args_for(method, pairs))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict[str, Any]:
    import psutil
    import torch

    cpu, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "peftbench"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed as a distribution
            versions[name] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = None, None
    return {
        "cpu": cpu,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_sha": sha,
        "src_dirty": dirty,
        "mkldnn_bf16_supported": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                              lambda: None)()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


# --------------------------------------------------------------------------- workers


def spawn(cfg: WorkerConfig, log_dir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh Python process; its JSON result, or an error."""
    stem = f"{cfg.method}-{cfg.variant}" + ("-gradient" if cfg.gradient_out else "")
    config_path, out_path = log_dir / f"{stem}.config.json", log_dir / f"{stem}.result.json"
    log_path = log_dir / f"{stem}.log"
    config_path.write_text(json.dumps(asdict(cfg)))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="warning")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(config_path),
               "--worker-out", str(out_path)]
    tick = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              check=False)
    wall = time.perf_counter() - tick
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        return {"error": f"worker exited with {proc.returncode}", "log_tail": tail,
                "process_seconds": wall}
    result = json.loads(out_path.read_text())
    result["process_seconds"] = wall
    return result


def compare_gradients(args: argparse.Namespace, method: str, with_reference: bool,
                      log_dir: Path) -> dict[str, Any]:
    """Step 1's gradients of (a) and, ``with_reference``, (a'), each from its own worker
    process and saved to a file, then (c)'s, whose worker compares them
    (:func:`~throughput_metrics.gradient_check`): this process never holds the gradients,
    which would count in the lifetime peak RSS of every worker it spawns later. The files
    are deleted after."""
    saved = ["trainer_default"] + ([REFERENCE] if with_reference else [])
    paths = {v: log_dir / f"{method}-{v}.gradient.pt" for v in [*saved, "peftbench"]}
    runs: dict[str, dict[str, Any]] = {}
    try:
        for variant, path in paths.items():
            cfg = worker_config(args, method, variant)
            cfg.gradient_out, cfg.gradient_rtol = str(path), args.gradient_rtol
            if variant == "peftbench":  # compares instead of saving
                cfg.gradient_compare = {v: str(paths[v]) for v in saved}
            runs[variant] = spawn(cfg, log_dir)
            if "error" in runs[variant]:
                return {"error": f"{LABELS[variant]}: {runs[variant]['error']}",
                        "log_tail": runs[variant].get("log_tail", [])}
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    check = runs["peftbench"]["gradient_check"]
    check["loss_trainer"] = runs["trainer_default"]["gradient_loss"]
    check["loss_peftbench"] = runs["peftbench"]["gradient_loss"]
    if with_reference:
        check["loss_reference_bf16"] = runs[REFERENCE]["gradient_loss"]
    check["precision_peftbench"] = runs["peftbench"].get("precision")
    return check


def worker_main(config_path: str, out_path: str) -> None:
    cfg = WorkerConfig(**json.loads(Path(config_path).read_text()))
    result = run_worker(cfg)
    Path(out_path).write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- report


def compute_precision(args: argparse.Namespace) -> tuple[str, dict[str, dict[str, Any]]]:
    """peftbench's resolved precision on ``--device`` (what its variant computes in, so what
    MFU is measured against) and the size of each peak measurement. A bf16 peak on a CPU
    that only emulates bf16 (about 1 GFLOP/s on an AVX2 CPU) is measured small: at 2048 it
    would take minutes. A GPU's peak needs larger matrices to fill it (8192)."""

    from peftbench.config import RunSpec
    from peftbench.errors import UsageError
    from peftbench.training.device import has_fast_bf16, resolve_device, resolve_precision

    try:
        device = resolve_device(args.device)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    precision = resolve_precision(args.precision or RunSpec.model_fields["precision"].default,
                                  device)
    n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    full = {"n": n, "reps": args.peak_reps, "device": device.type}
    small = {"n": min(n, 256), "reps": 2, "inner": 2, "device": device.type}
    return precision, {"fp32": full, "bf16": full if has_fast_bf16(device) else small}


def summarise(method: str, runs: dict[str, dict[str, Any]], peak: float,
              args: argparse.Namespace) -> dict[str, Any]:
    """One method's table row data; MFU against ``peak``, the peak of peftbench's precision."""
    full = method == "full"
    reference = runs.pop(REFERENCE, None)
    masked = runs.pop(MASKED, None)
    stats = {v: rep_stats(r, full, peak) for v, r in runs.items() if "error" not in r}
    tps = {v: stats[v]["tokens_per_s"] if v in stats else None for v in runs}
    out: dict[str, Any] = {
        "tokens_per_s": tps,
        "ratio_vs_default": {v: ratio(t, tps.get("trainer_default")) for v, t in tps.items()},
        "ratio_vs_tuned": {v: ratio(t, tps.get("trainer_tuned")) for v, t in tps.items()},
        "mfu": {v: stats[v]["mfu"] if v in stats else None for v in runs},
        "mfu_strict": {v: stats[v]["mfu_strict"] if v in stats else None for v in runs},
        "mfu_local": {v: stats[v]["mfu_local"] if v in stats else None for v in runs},
        "achieved_gflops": {v: stats[v]["achieved_gflops"] if v in stats else None
                            for v in runs},
        "rep_spread": {v: stats[v]["spread"] if v in stats else None for v in runs},
        "peak_rss_mb": {v: r.get("peak_rss_mb") for v, r in runs.items()},
        "peak_device_mb": {v: r.get("peak_device_mb") for v, r in runs.items()},
        "train_peak_rss_mb": {v: r.get("train_peak_rss_mb") for v, r in runs.items()},
        "params": next((r["params"] for r in runs.values() if "params" in r), None),
        "lr": next((r["lr"] for r in runs.values() if "lr" in r), None),
        "flops_formula": "6*N_total*P" if full else "(4*N_total + 2*N_trainable)*P",
        "errors": {v: r for v, r in runs.items() if "error" in r},
    }
    a, c = runs.get("trainer_default", {}), runs.get("peftbench", {})
    if "losses" in a and "losses" in c:
        ref_losses = reference.get("losses") if reference else None
        masked_losses = masked.get("losses") if masked else None
        out["loss_check"] = loss_check(a["losses"], c["losses"], args.loss_steps,
                                       args.loss_rtol, args.loss_atol, ref_losses,
                                       masked=masked_losses)
        out["loss_check"]["precision_trainer"] = a.get("precision")
        out["loss_check"]["precision_peftbench"] = c.get("precision")
    else:
        out["loss_check"] = None
    out["runs"] = {v: {**r, "rep_stats": stats.get(v)} for v, r in runs.items()}
    for variant, run in ((REFERENCE, reference), (MASKED, masked)):
        if run is not None:
            out["runs"][variant] = run
            if "error" in run:
                out["errors"][variant] = run
    return out


def draws_own_masks(args: argparse.Namespace, method: str, peftbench_run: dict[str, Any]) -> bool:
    """Whether peftbench's run (its result; a failed run has no record) drew LoRA dropout
    masks of its own and no others: LoRA layers through the compiled kernels (the record
    counts either all fused layers or none), every dropout with p > 0 one of theirs
    (``fast_dropout`` counts them all), no ``torch.compile`` (its graph runs peft's own
    forward), and the method's dropout above 0."""
    from peftbench.methods import get_method

    fast_path = peftbench_run.get("fast_path") or {}
    compiled = fast_path.get("lora_kernel", 0)
    if args.compile or not compiled or fast_path.get("fast_dropout") != compiled:
        return False
    resolved = get_method(method).resolve_args(method_args_for(method, args.method_arg))
    return float(resolved.get("dropout") or 0.0) > 0.0


def targets(methods: dict[str, Any]) -> dict[str, Any]:
    """The lead's targets, evaluated on this run (informative: this run may be noisy)."""
    lora, full = methods.get("lora"), methods.get("full")
    out: dict[str, Any] = {}
    if lora:
        vs_default = lora["ratio_vs_default"].get("peftbench")
        vs_tuned = lora["ratio_vs_tuned"].get("peftbench")
        mfu = lora["mfu"].get("peftbench")
        out["lora_vs_default_ge_3x"] = {"value": vs_default,
                                        "met": vs_default is not None and vs_default >= 3}
        out["lora_vs_tuned_ge_1.5x"] = {"value": vs_tuned,
                                        "met": vs_tuned is not None and vs_tuned >= 1.5}
        out["lora_mfu_ge_60pct"] = {"value": mfu, "met": mfu is not None and mfu >= 0.6}
        local = lora["mfu_local"].get("peftbench")
        if local is not None:
            out["lora_mfu_local_ge_60pct"] = {"value": local, "met": local >= 0.6}
    if lora and full:
        a, b = lora["peak_rss_mb"].get("peftbench"), full["peak_rss_mb"].get("peftbench")
        value = ratio(a, b)
        out["lora_rss_le_0.6x_full"] = {"value": value, "met": value is not None and value <= 0.6}
        a, b = lora["peak_device_mb"].get("peftbench"), full["peak_device_mb"].get("peftbench")
        if a is not None and b is not None:  # on a GPU: the memory that limits the batch
            value = ratio(a, b)
            out["lora_gpu_memory_le_0.6x_full"] = {"value": value,
                                                   "met": value is not None and value <= 0.6}
    return out


def pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def short_name(parameter: str | None) -> str:
    """A parameter name without peft's and the causal LM's wrapper prefixes."""
    name = parameter or ""
    for prefix in ("base_model.model.", "model."):
        name = name.removeprefix(prefix)
    return name


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    peaks, settings = report["peaks"], report["settings"]
    against = peaks.get("mfu_against", "bf16")
    ref = peaks[against]
    console.print(f"[bold]peak[/]: fp32 {peaks['fp32']['gflops_best']:.0f} GFLOP/s "
                  f"({peaks['fp32']['n']}x{peaks['fp32']['n']}), bf16 "
                  f"{peaks['bf16']['gflops_best']:.1f} GFLOP/s ({peaks['bf16']['n']}x"
                  f"{peaks['bf16']['n']}); {ref['threads']} threads, best of {ref['reps']}. "
                  f"peftbench computes in {against}: MFU is against the {against} peak, the "
                  f"higher of before/after the runs ({ref.get('gflops_best_before', 0):.0f} / "
                  f"{ref.get('gflops_best_after', 0):.0f})")
    device = settings.get("device", "cpu")
    on_gpu = device != "cpu"
    where = f"{device} ({report['machine'].get('gpu')})" if on_gpu else device
    console.print(f"[bold]setup[/]: {settings['model']} on {settings['task']}, {where}, batch "
                  f"{settings['batch_size']}, {settings['warmup']} warm-up + "
                  f"{settings['reps']} x {settings['steps']} timed steps, load average "
                  f"{report['load_average']['before'][0]:.2f} -> "
                  f"{report['load_average']['after'][0]:.2f} on "
                  f"{report['machine']['usable_cores']} cores")

    table = Table(title="Training throughput (median of repetitions)"
                  + (f" on {report['machine'].get('gpu')}" if on_gpu else ""))
    columns = ["method", "variant", "tokens/s", "x (a)", "x (b)", "MFU", "MFU strict",
               "MFU local", "peak RSS MB", "train RSS MB", "rep spread"]
    if on_gpu:
        columns.insert(8, "GPU MB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "variant") else "right")
    for method, m in report["methods"].items():
        for variant in m["tokens_per_s"]:
            if variant in m["errors"]:
                table.add_row(method, SHORT[variant], "[red]failed[/]",
                              *["-"] * (len(columns) - 3))
                continue
            gpu = [fmt(m["peak_device_mb"].get(variant), ".0f")] if on_gpu else []
            table.add_row(
                method, SHORT[variant],
                fmt(m["tokens_per_s"][variant], ".0f"),
                fmt(m["ratio_vs_default"][variant], ".2f", "x"),
                fmt(m["ratio_vs_tuned"][variant], ".2f", "x"),
                fmt(None if m["mfu"][variant] is None else 100 * m["mfu"][variant], ".1f", "%"),
                fmt(None if m["mfu_strict"][variant] is None
                    else 100 * m["mfu_strict"][variant], ".1f", "%"),
                fmt(pct(m.get("mfu_local", {}).get(variant)), ".1f", "%"),
                *gpu,
                fmt(m["peak_rss_mb"][variant], ".0f"),
                fmt(m["train_peak_rss_mb"][variant], ".0f"),
                fmt(m["rep_spread"][variant], ".2f"),
            )
        table.add_section()
    console.print(table)

    checks = {k: m["loss_check"] for k, m in report["methods"].items() if m["loss_check"]}
    if checks:
        summary = Table(title="Loss check: (c) peftbench against its baseline: (a), or (a'') "
                        "where peftbench draws its own LoRA dropout masks")
        for column in ("method", "baseline", "steps", "max |diff|", "mean |diff|",
                       "(a') mean |diff|", "mean allowed", "step-1 rel", "(a') step-1 rel",
                       "fixed tol.", "per-step failures", "passed"):
            summary.add_column(column, justify="left" if column == "method" else "right")
        for method, check in checks.items():
            summary.add_row(method, "(" + check["baseline"].split(":")[0] + ")",
                            str(check["steps_compared"]),
                            fmt(check["max_abs_diff"], ".2e"), fmt(check["mean_abs_diff"], ".2e"),
                            fmt(check.get("reference_mean_abs_diff"), ".2e"),
                            fmt(check.get("mean_abs_diff_allowed"), ".2e"),
                            fmt(100 * check["first_step_rel_diff"], ".3g", "%"),
                            fmt(pct(check.get("reference_first_step_rel_diff")), ".3g", "%"),
                            "yes" if check["passed_fixed_tolerance"] else "no",
                            ", ".join(map(str, check.get("failed_steps", []))) or "-",
                            "[green]yes[/]" if check["passed"] else "[red]NO[/]")
        console.print(summary)
        for rule in dict.fromkeys(check["rule"] for check in checks.values()):
            console.print(f"rule: {rule}")
        first = next(iter(checks.values()))
        console.print(f"precision (a): {first['precision_trainer']}, "
                      f"(c): {first['precision_peftbench']}")
        losses = Table(title="First losses: (a) Trainer default fp32, (a') (a) + bf16, (a'') (a) "
                       "with peftbench's dropout masks, (c) peftbench")
        losses.add_column("step", justify="right")
        keys = {"a": "losses_trainer", "a'": "losses_reference_bf16",
                "a''": "losses_masked", "c": "losses_peftbench"}
        shown = {method: [tag for tag, key in keys.items() if tag in ("a", "c") or check.get(key)]
                 for method, check in checks.items()}
        for method, tags in shown.items():
            for tag in tags:
                losses.add_column(f"{method} {tag}", justify="right")
        longest = max(check["steps_compared"] for check in checks.values())
        for step in range(longest):
            row = [str(step + 1)]
            for method, check in checks.items():
                for tag in shown[method]:
                    values = check.get(keys[tag]) or []
                    row.append(fmt(values[step] if step < len(values) else None, ".4f"))
            losses.add_row(*row)
        console.print(losses)

    grads = {k: m["gradient_check"] for k, m in report["methods"].items()
             if m.get("gradient_check")}
    if grads:
        table = Table(title="Gradient check: step 1, same weights and batch, dropout off")
        for column in ("method", "|g_c - g_a| / |g_a|", "(a') same", "bound", "cosine (c)",
                       "worst tensor (c)", "loss a / a' / c", "passed"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, check in grads.items():
            if "error" in check:
                table.add_row(method, *[""] * 6, f"[red]{check['error']}[/]")
                continue
            losses = " / ".join(fmt(check.get(k), ".4f") for k in
                                ("loss_trainer", "loss_reference_bf16", "loss_peftbench"))
            table.add_row(method, fmt(check["rel_error"], ".2e"),
                          fmt(check.get("reference_rel_error"), ".2e"),
                          fmt(check["bound"], ".2e"),
                          fmt(check["cosine"], ".6f"),
                          f"{fmt(check['worst_tensor_rel_error'], '.2e')} "
                          f"{short_name(check['worst_tensor'])}",
                          losses, "[green]yes[/]" if check["passed"] else "[red]NO[/]")
        console.print(table)
        rules = [c["rule"] for c in grads.values() if "rule" in c]
        if rules:
            console.print(f"rule: {rules[0]}")

    for method, m in report["methods"].items():
        for variant, error in m["errors"].items():
            console.print(f"[red]{method} / {variant} failed[/]: {error['error']}")
            console.print("\n".join(error.get("log_tail", [])))
    if report["targets"]:
        parts = [f"{name}: {fmt(t['value'], '.2f')} ({'met' if t['met'] else 'not met'})"
                 for name, t in report["targets"].items()]
        console.print("[bold]targets[/] " + "; ".join(parts))
    console.print(f"[dim]{report['noise_note']}[/]")


# --------------------------------------------------------------------------- modes


def run_profile(args: argparse.Namespace) -> None:
    check_method_args([args.profile], args.method_arg)
    cfg = worker_config(args, args.profile, args.profile_variant)
    cfg.profile_steps = args.profile_steps
    cfg.profile_rows = args.profile_rows
    cfg.profile_trace = args.profile_trace
    cfg.count_ops = args.profile_ops
    result = run_worker(cfg)
    if args.profile_ops:
        counts = result["op_counts"]
        print(f"{args.profile} / {args.profile_variant}: {counts['ops_per_step']:.0f} ATen "
              f"operators per step, not counting {counts['views_per_step']:.0f} views (mean of "
              f"{counts['steps']} steps after {cfg.warmup} warm-up; precision: "
              f"{result['precision']})")
        for name, per_step in counts["top"]:
            print(f"  {per_step:8.1f}  {name}")
        return
    steps = result["step_seconds"]
    profiled = steps[cfg.warmup:]
    print(f"{args.profile} / {args.profile_variant}: {cfg.warmup} warm-up steps, "
          f"{len(profiled)} profiled steps of "
          + ", ".join(f"{s:.2f}" for s in profiled) + " s (the profiler adds overhead); "
          f"gathered logits: {result.get('gathered_logits')}, precision: {result['precision']}")
    print("\nTop ops by self CPU time:")
    print(result.get("profile_table") or "(no profile recorded)")
    print("\nBy input shape:")
    print(result.get("profile_by_shape") or "")
    if args.profile_trace:
        print(f"Chrome trace written to {args.profile_trace}")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    console = Console(stderr=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    check_method_args(methods, args.method_arg)
    threads = args.threads or usable_cores()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    machine = machine_info(threads)
    precision, peak_sizes = compute_precision(args)
    size = peak_sizes[precision]["n"]
    console.print(f"peftbench computes in {precision} on {args.device}; measuring matmul peak "
                  f"({size}x{size}, {threads} threads)...")
    if args.bf16_reference and precision != "bf16":
        console.print("(a') bf16 loss reference skipped: it calibrates bf16 deviations and "
                      "peftbench computes in fp32 here")
    peaks = {d: matmul_peak_gflops(d, threads=threads, **size) for d, size in peak_sizes.items()}
    keep = Path(args.log_dir) if args.log_dir else None
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="throughput-")
    log_dir = keep or Path(tmp.name)  # type: ignore[union-attr]
    log_dir.mkdir(parents=True, exist_ok=True)
    all_runs: dict[str, dict[str, dict[str, Any]]] = {}
    gradients: dict[str, dict[str, Any]] = {}
    try:
        for method in methods:
            runs = all_runs.setdefault(method, {})
            for variant in variants:
                console.print(f"{method} / {LABELS[variant]} ...", end=" ")
                run = spawn(worker_config(args, method, variant), log_dir)
                runs[variant] = run
                if "error" in run:
                    console.print(f"[red]{run['error']}[/]")
                else:
                    tps = rep_stats(run, method == "full", None)["tokens_per_s"]
                    console.print(f"{fmt(tps, '.0f')} tokens/s (setup {run['setup_seconds']:.0f}"
                                  f" s, training {run['train_wall_seconds']:.0f} s, peak RSS "
                                  f"{run['peak_rss_mb']:.0f} MB)")
            if (args.bf16_reference and precision == "bf16" and "trainer_default" in variants
                    and "peftbench" in variants):
                console.print(f"{method} / {LABELS[REFERENCE]} ...", end=" ")
                run = spawn(worker_config(args, method, REFERENCE), log_dir)
                runs[REFERENCE] = run
                console.print(f"[red]{run['error']}[/]" if "error" in run
                              else f"{len(run.get('losses', []))} losses")
            if (args.masked_reference and "trainer_default" in variants
                    and draws_own_masks(args, method, runs.get("peftbench", {}))):
                console.print(f"{method} / {LABELS[MASKED]} ...", end=" ")
                run = spawn(worker_config(args, method, MASKED), log_dir)
                runs[MASKED] = run
                console.print(f"[red]{run['error']}[/]" if "error" in run
                              else f"{len(run.get('losses', []))} losses")
            if args.gradient_check and {"trainer_default", "peftbench"} <= set(variants):
                with_reference = args.bf16_reference and precision == "bf16"
                console.print(f"{method} / step 1 gradients ...", end=" ")
                gradients[method] = compare_gradients(args, method, with_reference, log_dir)
                check = gradients[method]
                console.print(f"[red]{check['error']}[/]" if "error" in check else
                              f"|g_c - g_a| / |g_a| = {check['rel_error']:.2e}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    load_after = os.getloadavg()

    # a busy machine can only make the peak look lower: measure it again after the runs
    # and use the higher of the two for MFU
    console.print("measuring matmul peak again...")
    for dtype, size in peak_sizes.items():
        again = matmul_peak_gflops(dtype, threads=threads, **size)
        peaks[dtype]["gflops_best_before"] = peaks[dtype]["gflops_best"]
        peaks[dtype]["gflops_best_after"] = again["gflops_best"]
        peaks[dtype]["gflops_best"] = max(peaks[dtype]["gflops_best"], again["gflops_best"])
    peaks["mfu_against"] = precision
    summaries = {method: summarise(method, runs, peaks[precision]["gflops_best"], args)
                 for method, runs in all_runs.items()}
    for method, summary in summaries.items():
        summary["gradient_check"] = gradients.get(method)

    report = {
        "benchmark": "peftbench training throughput (benchmarks/throughput.py)",
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average": {"before": load_before, "after": load_after},
        "noise_note": (f"load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
                       f"on {machine['usable_cores']} cores; a load near or above the core "
                       "count while measuring means other jobs shared the cores and the "
                       "numbers are noisy"),
        "peaks": peaks,
        "settings": {
            "model": args.model, "task": args.task, "data_dir": args.data_dir,
            "device": args.device,
            "train_size": args.train_size, "batch_size": args.batch_size, "steps": args.steps,
            "reps": args.reps, "warmup": args.warmup, "seq_len": args.seq_len,
            "max_target_length": args.max_target_length, "seed": args.seed,
            "threads": threads, "peftbench_precision": args.precision or "RunSpec default",
            "peftbench_precision_resolved": precision,
            "methods": methods, "variants": variants, "method_args": args.method_arg,
            "peftbench_compile": args.compile,
        },
        "flops_formula": FLOPS_FORMULA,
        "methods": summaries,
    }
    report["targets"] = targets(summaries)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return
    if args.profile:
        run_profile(args)
        return
    report = run_benchmark(args)
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
