"""One fine-tuning run, top to bottom: data, model, method, train, validate, test, record.

Read :func:`train` like a recipe. Everything it needs is built by small helpers; it returns
the result record (a plain dict, the content of ``result.json``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import set_seed

from peftbench.config import RunSpec
from peftbench.evaluation.evaluator import Evaluator
from peftbench.files import umask_mode
from peftbench.methods import count_parameters
from peftbench.models import load_model
from peftbench.tasks import load_task
from peftbench.tasks.base import Example
from peftbench.training.batches import endless_batches
from peftbench.training.device import (
    autocast_factory,
    resolve_device,
    resolve_precision,
    slow_bf16_warning,
)
from peftbench.training.encoding import IGNORE, Encoded, TextEncoder
from peftbench.training.memory import PeakMemory
from peftbench.training.model_prep import (
    attach_method,
    forward_for_training,
    place_for_training,
    use_gathered_logits,
)
from peftbench.training.provenance import hardware
from peftbench.training.step import build_optimization, train_step
from peftbench.training.token_cache import open_cache

Event = dict[str, Any]
EventSink = Callable[[Event], None]


class Diverged(Exception):
    """The training loss became NaN or infinite."""


def plan_steps(spec: RunSpec, train_examples: int) -> int:
    """Optimizer steps: ``--max-steps``, else ``--epochs`` (default 3) over the train set."""
    if spec.max_steps is not None:
        return spec.max_steps
    per_step = spec.batch_size * spec.grad_accum
    return max(1, math.ceil((spec.epochs or 3.0) * train_examples / per_step))


def epochs_trained(spec: RunSpec, total_steps: int, train_examples: int) -> float:
    """Passes over the training set that ``total_steps`` optimizer steps make."""
    return total_steps * spec.batch_size * spec.grad_accum / max(1, train_examples)


def epochs_warning(spec: RunSpec, total_steps: int, train_examples: int) -> str | None:
    """A warning when ``--epochs`` ends up training clearly more epochs than asked (one
    optimizer step holds more examples than the training set has, or nearly)."""
    if spec.max_steps is not None or not train_examples:
        return None
    per_step = spec.batch_size * spec.grad_accum
    asked = spec.epochs or 3.0
    seen = epochs_trained(spec, total_steps, train_examples)
    if seen <= asked * 1.1:
        return None
    return (f"epochs {asked:g}: an optimizer step holds {per_step} examples (batch size "
            f"{spec.batch_size} x grad accum {spec.grad_accum}) and the training set "
            f"{train_examples}, so {total_steps} step(s) train {_epochs_text(seen)} epochs; "
            "lower the batch size or gradient accumulation, or set max_steps")


SMALL_SPLIT = 20  # fewer evaluation examples than this: a score moves by 5 points per example


def small_split_warning(spec: RunSpec, sizes: dict[str, int]) -> str | None:
    """A warning when the validation or test split is tiny (a task carved from a few rows)
    and not only because ``max_eval_examples`` asked for so few."""
    wanted = min(SMALL_SPLIT, spec.max_eval_examples or SMALL_SPLIT)
    small = {split: n for split, n in sizes.items() if split != "train" and 0 < n < wanted}
    if not small:
        return None
    listed = ", ".join(f"{split} {n}" for split, n in small.items())
    return (f"few evaluation examples ({listed}): one example is worth "
            f"{100 / min(small.values()):.0f} points of a score, so the scores say little; "
            "give the task more rows, or validation/test files of its own")


LEAK_SHARE = 0.1  # evaluation examples also trained on, from this share up: a warning


def overlap_warning(train: Sequence[Example], splits: dict[str, Sequence[Example]]
                    ) -> str | None:
    """A warning when many validation/test examples (input and target) are also training
    examples: a split read from the training file, or overlapping files. Their scores
    measure memory, not generalisation."""
    trained = {(e.input, e.target) for e in train}
    shared = {split: sum((e.input, e.target) in trained for e in examples)
              for split, examples in splits.items() if examples}
    heavy = [f"{n} of {len(splits[split])} {split}" for split, n in shared.items()
             if n >= LEAK_SHARE * len(splits[split])]
    if not heavy:
        return None
    return (f"{', '.join(heavy)} examples are also training examples: their scores measure "
            "what was memorised, not how the model generalises; give the task validation/"
            "test files without its training rows")


def _epochs_text(epochs: float) -> str:
    """``4.0``, ``1.5``; below one epoch two significant digits (``0.016``, not ``0.0``)."""
    return f"{epochs:.1f}" if epochs >= 1 else f"{epochs:.2g}"


def eval_steps(spec: RunSpec, total: int) -> list[int]:
    """Validation points: step 0, every ``eval_every`` steps, and the last step."""
    every = spec.eval_every or max(1, math.ceil(total / spec.num_evals))
    return sorted({0, *range(every, total, every), total})


def max_new_tokens(train_set: Sequence[Encoded], cap: int) -> int:
    """Generation budget from the task's target lengths (the labelled tokens of the first
    2,000 training examples): the longest seen, plus a margin."""
    lengths = [sum(label != IGNORE for label in e.labels) for e in train_set[:2000]]
    return max(1, min(cap, math.ceil(max(lengths, default=cap) * 1.25) + 2))


def train(spec: RunSpec, record: dict[str, Any], out_dir: Path,
          on_event: EventSink | None = None) -> None:
    """Run ``spec`` and fill ``record`` (curve, scores, params, efficiency) as it goes."""
    emit = on_event or (lambda event: None)
    memory = PeakMemory()
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    record["run"]["precision"] = precision
    if warning := slow_bf16_warning(spec.precision, device):
        record["run"].setdefault("warnings", []).append(warning)
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    autocast = autocast_factory(device, precision)
    record["provenance"]["hardware"] = hardware(device)

    # 1. data and model, seeded before anything random is built
    set_seed(spec.seed)
    task = load_task(spec.task, data_dir=spec.data_dir, train_size=spec.train_size,
                     seed=spec.seed, max_eval_examples=spec.max_eval_examples)
    record["task"] = {"name": task.spec.name, "type": task.spec.type, "source": task.source,
                      "primary_metric": task.spec.primary_metric, "notes": task.notes,
                      "sizes": {"train": len(task.train), "validation": len(task.validation),
                                "test": len(task.test)}}
    record["provenance"]["data_fingerprint"] = task.fingerprint
    for warning in (small_split_warning(spec, record["task"]["sizes"]),
                    overlap_warning(task.train, {"validation": task.validation,
                                                 "test": task.test})):
        if warning:
            record["run"].setdefault("warnings", []).append(warning)
    loaded = load_model(spec.model, seed=spec.seed)
    record["model"] = {"name": loaded.name, "source": loaded.source,
                       "pretrained": loaded.pretrained,
                       "family": "encoder-decoder" if loaded.is_encoder_decoder else "decoder-only"}
    record["provenance"]["model_fingerprint"] = loaded.fingerprint

    # 2. the method turns the base model into the model to train
    method, args, model = attach_method(spec, loaded)
    record["run"]["method_args"] = args
    record["run"]["fast_path"] = place_for_training(model, precision, device,
                                                    exact=spec.precision == "fp32")
    trainable, total = count_parameters(model)
    record["params"] = {"trainable": trainable, "total": total,
                        "trainable_pct": 100.0 * trainable / total}

    # 3. tokenise once; evaluators reuse their prompts at every validation
    tick = time.perf_counter()
    encoder = TextEncoder(loaded.tokenizer, loaded.is_encoder_decoder, spec.max_source_length,
                          spec.max_target_length, open_cache(loaded.tokenizer))
    train_set = encoder.encode_many([(e.input, e.target) for e in task.train])
    tokenise_seconds = time.perf_counter() - tick
    method.check_lengths(loaded.model, args, max(len(e.input_ids) for e in train_set),
                         encoder_decoder=loaded.is_encoder_decoder)
    gather = use_gathered_logits(model, train_set, encoder.pad_id, device, autocast,
                                 loaded.is_encoder_decoder)
    record["run"]["gathered_logits"] = gather
    new_tokens = max_new_tokens(train_set, spec.max_target_length)
    tick = time.perf_counter()
    validation, test = (Evaluator(task.spec, encoder, split, device, autocast,
                                  spec.batch_size * 2, new_tokens, gather)
                        for split in (task.validation, task.test))
    record["run"]["tokenization"] = {  # training pairs, then the evaluators' prompts
        "seconds": round(tokenise_seconds + time.perf_counter() - tick, 3),
        "texts_from_cache": encoder.cache.stats.cached,
        "texts_tokenised": encoder.cache.stats.tokenised}

    # 4. optimiser and schedule
    lr = spec.lr or method.default_lr
    record["run"]["lr"] = lr
    total_steps = plan_steps(spec, len(train_set))
    opt = build_optimization(model, lr, spec, total_steps)
    checkpoints = set(eval_steps(spec, total_steps))
    record["run"]["total_steps"] = total_steps
    record["run"]["epochs"] = round(epochs_trained(spec, total_steps, len(train_set)), 3)
    if warning := epochs_warning(spec, total_steps, len(train_set)):
        record["run"].setdefault("warnings", []).append(warning)

    # 5. the loop
    forward_model = forward_for_training(model, spec)
    batches = endless_batches(train_set, spec.batch_size, spec.seed)
    curve = record["curve"]
    best_score, best_state, best_step = -math.inf, None, 0
    train_seconds = eval_seconds = 0.0
    samples = tokens = 0
    losses: list[float] = []
    model.train()
    for step in range(total_steps + 1):
        if step > 0:
            tick = time.perf_counter()
            result = train_step(forward_model, batches, encoder.pad_id, spec, opt, device, autocast,
                                loaded.is_encoder_decoder, gather)
            if not math.isfinite(result.loss):
                raise Diverged(f"training loss became {result.loss} at step {step}")
            samples += result.samples
            tokens += result.tokens
            train_seconds += time.perf_counter() - tick
            losses.append(result.loss)
            emit({"type": "step", "step": step, "total": total_steps, "loss": result.loss})
        if step in checkpoints:
            tick = time.perf_counter()
            scores = validation.evaluate(model)
            eval_seconds += time.perf_counter() - tick
            score = scores[task.spec.primary_metric]
            curve.append({"step": step, "samples": samples, "seconds": round(train_seconds, 3),
                          "train_loss": sum(losses) / len(losses) if losses else None,
                          "val_score": score})
            losses = []
            memory.sample()
            emit({"type": "eval", "step": step, "total": total_steps, "val_score": score})
            if score > best_score:
                best_score, best_step = score, step
                best_state = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}
                record["scores"]["val"] = scores
                record["scores"]["best_step"] = step

    # 6. the best validation checkpoint is the one tested and saved
    if best_state is not None and best_step != total_steps:
        model.load_state_dict(best_state, strict=False)
    tick = time.perf_counter()
    record["scores"]["test"] = test.evaluate(model)
    eval_seconds += time.perf_counter() - tick
    adapter_dir = save_adapter(method, model, out_dir)
    memory.sample()
    record["efficiency"] = {
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "tokens_per_second": tokens / train_seconds if train_seconds else None,
        "train_tokens": tokens,
        "peak_rss_mb": memory.peak_rss_mb(),
        "peak_gpu_mb": memory.peak_gpu_mb(device),
        "adapter_bytes": sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file()),
    }


def save_adapter(method: Any, model: Any, out_dir: Path) -> Path:
    """Save the trained weights as ``out_dir/adapter``, replacing any earlier adapter there
    whole (a reused folder must not keep another method's files): written to a temporary
    folder first, so a failed save leaves the earlier one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "adapter"
    fresh = Path(tempfile.mkdtemp(dir=out_dir, prefix=".adapter."))
    fresh.chmod(umask_mode(0o777))  # as mkdir would make it (mkdtemp: owner only)
    old = Path(tempfile.mkdtemp(dir=out_dir, prefix=".adapter-old."))
    try:
        method.save(model, fresh)
        for written in fresh.rglob("*"):  # safetensors writes owner-only (0600) files
            if written.is_file():
                written.chmod(umask_mode(0o666))
        if target.exists():
            target.rename(old / "adapter")
        try:
            fresh.rename(target)
        except OSError:
            if (old / "adapter").exists():
                (old / "adapter").rename(target)
            raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target
