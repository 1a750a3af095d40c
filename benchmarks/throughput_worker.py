"""One (method, variant) configuration of benchmarks/throughput.py, run in its own process.

Variants:

- ``trainer_default``  Hugging Face ``Trainer`` with ``TrainingArguments`` defaults, except
  what must be set to train the same thing (see :func:`trainer_arguments`); fp32.
- ``trainer_tuned``    the same plus the usual speed flags: bf16 autocast (where the hardware
  computes bf16 natively, the rule of peftbench's ``precision: auto``), length-grouped
  sampling, sensible dataloader settings, no per-step logging or progress bar.
- ``trainer_bf16``     optional reference: ``trainer_default`` plus ``bf16=True`` (standard
  autocast mixed precision with fp32 weights), same order: how far bf16 alone moves losses.
- ``trainer_masks``    optional reference: ``trainer_default`` with its LoRA dropouts drawing
  peftbench's compiled layers' masks (``kernel_masks.py``): the losses peftbench's bf16 run
  should follow when only arithmetic differs.
- ``peftbench``        peftbench's own training step, built from its ``training/`` blocks in
  the order ``training/loop.py`` uses them (see :func:`run_peftbench`).

Every variant builds the model the same way (same base, ``set_seed``, the method via
``peftbench.methods``) and sees the same tokenised examples; the default Trainer also sees
them in peftbench's batch order, so its losses can be compared step by step.

Timing: wall-clock between the ends of optimizer steps (everything a step costs: data,
collation, forward, backward, clipping, optimizer, scheduler, logging). ``warmup`` steps are
dropped, then ``reps`` repetitions of ``steps`` steps are timed.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

VARIANTS = ("trainer_default", "trainer_tuned", "peftbench")
# optional: Trainer defaults + bf16=True, in peftbench's order; a reference for how far
# standard bf16 mixed precision alone moves the losses away from fp32 (loss check only)
REFERENCE = "trainer_bf16"
# optional: Trainer defaults (fp32) with peftbench's LoRA dropout masks, in peftbench's
# order; the loss check's baseline where peftbench's compiled LoRA layers draw the masks
MASKED = "trainer_masks"
ALL_VARIANTS = (*VARIANTS, REFERENCE, MASKED)


@dataclass
class WorkerConfig:
    model: str
    task: str
    method: str
    variant: str
    device: str = "cpu"  # cpu | cuda: where every variant trains
    data_dir: str | None = None
    train_size: int = 512
    batch_size: int = 16
    warmup: int = 3
    reps: int = 3
    steps: int = 10
    seed: int = 0
    threads: int = 0
    precision: str | None = None  # peftbench variant: auto | bf16 | fp32 (default: RunSpec's)
    max_source_length: int | None = None
    max_target_length: int | None = None
    loss_steps: int = 20
    method_args: dict[str, Any] = field(default_factory=dict)  # overrides of method defaults
    compile: bool = False  # peftbench variant: torch.compile the training forward
    profile_steps: int = 0  # > 0: profile this many steps after warm-up instead of timing reps
    profile_rows: int = 30
    profile_trace: str | None = None
    count_ops: bool = False  # with profile_steps: count dispatched operators, not time them
    gradient_out: str | None = None  # set: only compute step 1's gradient and save it here
    # with gradient_out: {variant: gradient file} to compare this gradient with, in this process
    gradient_compare: dict[str, str] = field(default_factory=dict)
    gradient_rtol: float = 0.03
    # set: matmul_peak_gflops's arguments; the clock measures the peak after the warm-up and
    # after each repetition, outside the timed steps (the local peak of each repetition)
    rep_peak: dict[str, Any] | None = None

    @property
    def total_steps(self) -> int:
        if self.profile_steps:
            return self.warmup + self.profile_steps
        return self.warmup + self.reps * self.steps


# --------------------------------------------------------------------------- measuring


class RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` s; keeps the peak of the training phase."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._halt = threading.Event()
        self.training = False
        self.train_peak = 0

    def run(self) -> None:
        while not self._halt.is_set():
            if self.training:
                self.train_peak = max(self.train_peak, self._process.memory_info().rss)
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def lifetime_peak_rss_mb() -> float:
    """The process's lifetime peak RSS (ru_maxrss, KiB on Linux), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class OpCounter:
    """Counts the ATen operators dispatched while entered (forward, backward, optimizer):
    on a GPU each is about one kernel launch, so this is the step's launch count, which is
    what a host-bound GPU step costs. A ``TorchDispatchMode``; entered like the profiler."""

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counts: Counter[str] = Counter()
        views: Counter[str] = Counter()
        self.counts, self.views = counts, views

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                # views (view, t, slice, ...) only make tensor metadata: no kernel
                (views if getattr(func, "is_view", False) else counts)[
                    str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Count()

    def __enter__(self) -> OpCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def summary(self, steps: int, rows: int) -> dict[str, Any]:
        per = max(steps, 1)
        return {"steps": steps, "ops_per_step": sum(self.counts.values()) / per,
                "views_per_step": sum(self.views.values()) / per,
                "top": [(name, n / per) for name, n in self.counts.most_common(rows)]}


class StepClock:
    """Step-end timestamps plus tokens/targets/positions of each step's batches.

    ``add_batch`` is called for every micro-batch, ``step_end`` after each optimizer step.
    With ``profile_steps`` it starts a torch profiler after ``warmup`` steps and stops it
    ``profile_steps`` steps later.
    """

    def __init__(self, cfg: WorkerConfig, virtual_tokens: int, encoder_decoder: bool,
                 rss: RssSampler | None) -> None:
        self.cfg = cfg
        self.virtual_tokens = virtual_tokens
        self.encoder_decoder = encoder_decoder
        self.rss = rss
        self.start: float | None = None
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.targets: list[int] = []
        self.positions: list[int] = []
        self._pending = [0, 0, 0]
        self.profiler = None
        self.profile_table: str | None = None
        self.op_counts: dict[str, Any] | None = None
        self.profile_by_shape: str | None = None
        #: peak GFLOP/s measured at a boundary (steps done: after the warm-up, after a
        #: repetition) and when timing resumed after it
        self.boundary_peaks: dict[int, float] = {}
        self.resumed: dict[int, float] = {}

    def begin(self) -> None:
        if self.cfg.rep_peak and not self.cfg.profile_steps and self.cfg.warmup == 0:
            self._measure_peak(0)  # no warm-up: the first repetition's peak before it
        if self.rss is not None:
            self.rss.training = True
        self.start = time.perf_counter()
        if self.cfg.profile_steps and self.cfg.warmup == 0:
            self._start_profiler()

    def counts(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        """(tokens, predicted targets, positions) of a collated batch held on the CPU."""
        mask, labels = batch["attention_mask"], batch["labels"]
        tokens = int(mask.sum())
        predicted = labels if self.encoder_decoder else labels[:, 1:]
        return (tokens, int((predicted != -100).sum()),
                tokens + self.virtual_tokens * mask.shape[0])

    def add_batch(self, batch: dict[str, Any]) -> None:
        self.add_counts(self.counts(batch))

    def add_counts(self, counts: tuple[int, int, int]) -> None:
        for i, value in enumerate(counts):
            self._pending[i] += value

    def step_end(self) -> None:
        if self.cfg.device != "cpu" and self._at_boundary(len(self.ends) + 1):
            import torch

            torch.cuda.synchronize()  # the queued work of the steps timed so far is done
        self.ends.append(time.perf_counter())
        self.tokens.append(self._pending[0])
        self.targets.append(self._pending[1])
        self.positions.append(self._pending[2])
        self._pending = [0, 0, 0]
        done = len(self.ends)
        if self.cfg.profile_steps:
            if done == self.cfg.warmup:
                self._start_profiler()
            elif done == self.cfg.warmup + self.cfg.profile_steps:
                self._stop_profiler()
        elif self.cfg.rep_peak and self._at_boundary(done):
            self._measure_peak(done)

    def _measure_peak(self, done: int) -> None:
        """The matmul peak now, in this process and its thread setting, untimed: the next
        step's clock starts after it. On a machine whose speed drifts over minutes (a shared
        VM), it is the peak that a repetition next to it could reach."""
        from throughput_metrics import matmul_peak_gflops

        training = self.rss is not None and self.rss.training
        if training:  # its matrices are not training's memory
            self.rss.training = False
        self.boundary_peaks[done] = matmul_peak_gflops(**self.cfg.rep_peak)["gflops_best"]
        if training:
            self.rss.training = True
        self.resumed[done] = time.perf_counter()

    def _at_boundary(self, done: int) -> bool:
        """True after the warm-up and after each timed repetition (or profiled block): on a
        GPU the clock waits for the device there, and only there, so a trainer that never
        synchronises within a repetition keeps its overlap of host and device."""
        cfg = self.cfg
        if done <= cfg.warmup:
            return done == cfg.warmup
        block = cfg.profile_steps or cfg.steps
        return (done - cfg.warmup) % block == 0

    def end(self) -> None:
        if self.rss is not None:
            self.rss.training = False
        if self.profiler is not None:
            self._stop_profiler()

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = (OpCounter() if self.cfg.count_ops else
                         profile(activities=[ProfilerActivity.CPU], record_shapes=True))
        self.profiler.__enter__()

    def _stop_profiler(self) -> None:
        prof, self.profiler = self.profiler, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        if isinstance(prof, OpCounter):
            self.op_counts = prof.summary(self.cfg.profile_steps, self.cfg.profile_rows)
            return
        averages = prof.key_averages()
        self.profile_table = averages.table(sort_by="self_cpu_time_total",
                                            row_limit=self.cfg.profile_rows)
        self.profile_by_shape = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=min(15, self.cfg.profile_rows))
        if self.cfg.profile_trace:
            prof.export_chrome_trace(self.cfg.profile_trace)

    @property
    def profiling(self) -> bool:
        return self.profiler is not None

    def summary(self) -> dict[str, Any]:
        """Per-step and per-repetition numbers (repetitions only when not profiling)."""
        starts = [self.resumed.get(i, self.ends[i - 1] if i else self.start)
                  for i in range(len(self.ends))]
        step_seconds = [e - s for s, e in zip(starts, self.ends, strict=True)]
        reps = []
        if not self.cfg.profile_steps:
            for r in range(self.cfg.reps):
                lo = self.cfg.warmup + r * self.cfg.steps  # steps lo+1 .. lo+steps (1-based)
                hi = lo + self.cfg.steps
                if hi > len(self.ends):
                    break
                reps.append({
                    "steps": self.cfg.steps,
                    "seconds": self.ends[hi - 1] - starts[lo],
                    "tokens": sum(self.tokens[lo:hi]),
                    "targets": sum(self.targets[lo:hi]),
                    "positions": sum(self.positions[lo:hi]),
                    **({"peak_before_gflops": self.boundary_peaks.get(lo),
                        "peak_after_gflops": self.boundary_peaks.get(hi)}
                       if self.cfg.rep_peak else {}),
                })
        return {"step_seconds": step_seconds, "step_tokens": self.tokens,
                "step_targets": self.targets, "step_positions": self.positions, "reps": reps}


def reseed(seed: int, step: int) -> None:
    """Same global RNG state before every step in every variant: identical dropout masks.

    Only LoRA (dropout 0.05) draws random numbers during a step here; the Trainer also draws
    one number when it creates its dataloader iterator, which would otherwise shift them.
    """
    import torch

    torch.manual_seed(seed * 1_000_003 + step)


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    spec: Any  # RunSpec with the benchmark's settings: the source of peftbench's defaults
    loaded: Any
    method: Any
    model: Any
    encoder: Any
    train_set: list
    lr: float
    notes: list[str]


def build(cfg: WorkerConfig) -> Setup:
    """Data, model and method, built as ``training/loop.py`` builds them."""
    from transformers import set_seed

    from peftbench.config import RunSpec
    from peftbench.models import load_model
    from peftbench.tasks import load_task
    from peftbench.training.encoding import TextEncoder
    from peftbench.training.model_prep import attach_method

    overrides: dict[str, Any] = {"batch_size": cfg.batch_size, "seed": cfg.seed,
                                 "max_steps": cfg.total_steps, "data_dir": cfg.data_dir,
                                 "train_size": cfg.train_size, "device": cfg.device,
                                 "method_args": cfg.method_args, "compile": cfg.compile}
    if cfg.precision:
        overrides["precision"] = cfg.precision
    if cfg.max_source_length:
        overrides["max_source_length"] = cfg.max_source_length
    if cfg.max_target_length:
        overrides["max_target_length"] = cfg.max_target_length
    spec = RunSpec(model=cfg.model, task=cfg.task, method=cfg.method, **overrides)

    set_seed(spec.seed)
    task = load_task(spec.task, data_dir=spec.data_dir, train_size=spec.train_size,
                     seed=spec.seed)
    loaded = load_model(spec.model, seed=spec.seed)
    method, _, model = attach_method(spec, loaded)  # as training/loop.py, fp32 until placed

    encoder = TextEncoder(loaded.tokenizer, loaded.is_encoder_decoder,
                          spec.max_source_length, spec.max_target_length)
    train_set = encoder.encode_many([(e.input, e.target) for e in task.train])
    notes = []
    extra = len(train_set) % spec.batch_size
    if extra:  # full batches only, so a flat example order cuts into peftbench's batches
        train_set = train_set[: len(train_set) - extra]
        notes.append(f"dropped {extra} training examples to make {len(train_set)}, a "
                     f"multiple of the batch size {spec.batch_size}")
    if not train_set:
        raise SystemExit(f"fewer training examples than one batch ({spec.batch_size})")
    return Setup(spec, loaded, method, model, encoder, train_set,
                 spec.lr or method.default_lr, notes)


def describe_params(model) -> dict[str, int]:
    """Parameter counts for the FLOPs formulas (shared tensors counted once)."""
    from peftbench.methods import count_parameters

    trainable, total = count_parameters(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    n_head = head.weight.numel() if head is not None else 0
    n_embed = embed.weight.numel() if embed is not None else 0
    tied = head is not None and embed is not None and head.weight is embed.weight
    tables = n_embed if tied else n_embed + n_head
    return {"trainable": trainable, "total": total, "head": n_head, "embed": n_embed,
            "tied": int(tied), "body": total - tables}


def virtual_tokens(model) -> int:
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return int(config.num_virtual_tokens)
    return 0


def warmup_steps(spec) -> int:
    """peftbench's LR warm-up over this worker's whole run (its ``max_steps``)."""
    from peftbench.training import step

    return step.warmup_steps(spec, spec.max_steps)


# --------------------------------------------------------------------------- peftbench


def prepare_peftbench(setup: Setup) -> tuple[Any, str, Any, dict[str, int], bool]:
    """(device, precision, autocast, fast path applied, gathered logits): the model placed
    with the loop's own functions, as ``training/loop.py`` places it."""
    from peftbench.training.device import autocast_factory, resolve_device, resolve_precision
    from peftbench.training.model_prep import place_for_training, use_gathered_logits

    spec, model = setup.spec, setup.model
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    autocast = autocast_factory(device, precision)
    fast_path = place_for_training(model, precision, device, exact=spec.precision == "fp32")
    gather = use_gathered_logits(model, setup.train_set, setup.encoder.pad_id, device,
                                 autocast, setup.loaded.is_encoder_decoder)
    return device, precision, autocast, fast_path, gather


def run_peftbench(cfg: WorkerConfig, setup: Setup, clock: StepClock) -> dict[str, Any]:
    """peftbench's own training step: ``training.step.train_step``, as ``loop.py`` calls it.

    Prepared with the loop's own functions: ``place_for_training`` (bf16 storage),
    ``use_gathered_logits``, ``build_optimization`` (fused AdamW, warm-up + linear decay),
    ``endless_batches``. Additions: ``reseed`` before each step, the clock (which
    counts each micro-batch's tokens through ``on_batch``), and, only when profiling,
    ``record_function`` labels around the step's phases.
    """
    import torch

    from peftbench.training.batches import endless_batches
    from peftbench.training.model_prep import (
        forward_for_training,
    )
    from peftbench.training.step import build_optimization, train_step

    spec, loaded, model, encoder = setup.spec, setup.loaded, setup.model, setup.encoder
    device, precision, autocast, fast_path, gather = prepare_peftbench(setup)
    train_set = setup.train_set
    opt = build_optimization(model, setup.lr, spec, spec.max_steps)
    forward_model = forward_for_training(model, spec)
    batches = endless_batches(train_set, spec.batch_size, spec.seed)
    losses: list[float] = []

    def phase(name: str) -> contextlib.AbstractContextManager:
        if clock.profiling:
            return torch.profiler.record_function(f"peftbench::{name}")
        return contextlib.nullcontext()

    model.train()
    clock.begin()
    for step in range(1, spec.max_steps + 1):
        reseed(spec.seed, step)
        result = train_step(forward_model, batches, encoder.pad_id, spec, opt, device, autocast,
                            loaded.is_encoder_decoder, gather, on_batch=clock.add_batch,
                            phase=phase)
        if not math.isfinite(result.loss):
            raise RuntimeError(f"training loss became {result.loss} at step {step}")
        losses.append(result.loss)
        clock.step_end()
    clock.end()
    return {"losses": losses, "gathered_logits": gather,
            "precision": "bf16 autocast (frozen matrices stored in bf16, fp32 residual stream)"
            if precision == "bf16" else "fp32, exact (torch dropout, peft's LoRA forward)"
            if spec.precision == "fp32" else "fp32 (FastDropout masks, fused LoRA layers)",
            "precision_resolved": precision,
            "fast_path": fast_path,
            "optimizer": f"{type(opt.optimizer).__name__}(fused={opt.optimizer.defaults['fused']})",
            "warmup_steps": warmup_steps(spec)}


# --------------------------------------------------------------------------- gradient


def probe_gradient(cfg: WorkerConfig, setup: Setup) -> dict[str, Any]:
    """The gradient of the first batch's loss at the starting weights, with dropout off,
    saved to ``cfg.gradient_out`` as {parameter name: fp32 gradient}.

    Every variant starts from the same weights and sees the same first batch, so without
    dropout they differ only in arithmetic. ``trainer_default`` and ``trainer_bf16``
    compute what the Trainer computes (the model's own loss, in fp32 or under bf16
    autocast), ``peftbench`` what its training step computes on its placed model (bf16
    storage and the fused layers included).
    """
    import torch

    from peftbench.training.batches import endless_batches
    from peftbench.training.encoding import collate, to_device
    from peftbench.training.objective import mean_loss

    spec, model, encoder = setup.spec, setup.model, setup.encoder
    batch = collate(next(endless_batches(setup.train_set, spec.batch_size, spec.seed)),
                    encoder.pad_id)
    encoder_decoder = setup.loaded.is_encoder_decoder
    precision = "bf16 autocast (fp32 weights)" if cfg.variant == REFERENCE else "fp32"
    if cfg.variant == "peftbench":
        device, precision, autocast, _, gather = prepare_peftbench(setup)
        batch = to_device(batch, device)

        def loss_of() -> Any:
            return mean_loss(model, batch, encoder_decoder, gather)
    else:
        device = torch.device(cfg.device)
        model.to(device)  # where the Trainer would put it
        batch = to_device(batch, device)
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                    if cfg.variant == REFERENCE else contextlib.nullcontext)

        def loss_of() -> Any:
            return model(**batch).loss
    model.eval()  # dropout off; gradients are still recorded
    with autocast():
        loss = loss_of()
    loss.backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
             for name, p in model.named_parameters() if p.requires_grad}
    out = {"gradient_loss": float(loss), "precision": precision, "gradient_tensors": len(grads),
           "gradient_elements": sum(g.numel() for g in grads.values())}
    if cfg.gradient_compare:
        # compared here, not in the parent: a worker's ru_maxrss starts from its parent's RSS
        # (Linux keeps the high-water mark across fork and exec), so a parent holding these
        # tensors would raise the lifetime peak of every configuration spawned after it
        from throughput_metrics import gradient_check

        others = {v: torch.load(path) for v, path in cfg.gradient_compare.items()}
        out["gradient_check"] = gradient_check(others["trainer_default"], grads,
                                               others.get(REFERENCE), rtol=cfg.gradient_rtol)
    else:
        torch.save(grads, cfg.gradient_out)
    return out


# --------------------------------------------------------------------------- Trainer


class ExampleDataset:
    """A map-style torch dataset over peftbench-encoded examples, in a fixed order."""

    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": list(example.input_ids),
                "attention_mask": [1] * len(example.input_ids),
                "labels": list(example.labels)}


def ordered_examples(setup: Setup) -> list:
    """The examples of peftbench's first ``total_steps`` batches, flattened in order."""
    from peftbench.training.batches import endless_batches

    batches = endless_batches(setup.train_set, setup.spec.batch_size, setup.spec.seed)
    flat = []
    for _ in range(setup.spec.max_steps):
        batch = next(batches)
        assert len(batch) == setup.spec.batch_size, "partial batch: train size not a multiple"
        flat.extend(batch)
    return flat


def dataloader_workers(threads: int) -> int:
    """Worker processes for the tuned Trainer: none on small machines (collation is cheap and
    a worker would take a core from the matmuls), two otherwise."""
    return 0 if threads <= 4 else 2


def tuned_uses_bf16(device: str = "cpu") -> bool:
    """The tuned Trainer turns bf16 on where the hardware computes it natively, the rule of
    peftbench's ``precision: auto``: nobody tuning for speed enables bf16 on a CPU that
    emulates it (about 100x slower than fp32 there)."""
    import torch

    from peftbench.training.device import has_fast_bf16

    return has_fast_bf16(torch.device(device))


def trainer_arguments(cfg: WorkerConfig, setup: Setup, out_dir: str, tuned: bool,
                      bf16: bool = False):
    """``TrainingArguments``: defaults, plus only what must be set (and the tuned flags)."""
    from transformers import TrainingArguments

    spec = setup.spec
    kwargs: dict[str, Any] = {
        "output_dir": out_dir,
        "per_device_train_batch_size": spec.batch_size,
        "max_steps": spec.max_steps,
        "learning_rate": setup.lr,  # the method's peftbench default
        # same LR schedule as peftbench (linear, warm-up ceil(0.06 * steps)); Trainer's
        # own default is no warm-up, which would make the losses incomparable
        "warmup_steps": warmup_steps(spec),
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "seed": spec.seed,
        "use_cpu": cfg.device == "cpu",  # the same device as peftbench
        # the dataset is already in peftbench's batch order: do not reshuffle it
        "train_sampling_strategy": "sequential",
    }
    if spec.weight_decay != 0.0 or spec.max_grad_norm != 1.0:  # Trainer defaults: 0.0, 1.0
        kwargs.update(weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm)
    if bf16:
        kwargs["bf16"] = True
    if tuned:
        workers = dataloader_workers(cfg.threads)
        kwargs.update(
            bf16=tuned_uses_bf16(cfg.device),
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
            dataloader_pin_memory=cfg.device != "cpu",  # nothing to pin for on CPU
            logging_steps=spec.max_steps,
            disable_tqdm=True,
        )
    return TrainingArguments(**kwargs)


def run_trainer(cfg: WorkerConfig, setup: Setup, clock: StepClock, tuned: bool,
                bf16: bool = False, kernel_masks: bool = False) -> dict[str, Any]:
    """Hugging Face Trainer on the same model, examples and (default variant) order; with
    ``bf16`` or ``kernel_masks`` a loss reference, stopped after ``cfg.loss_steps``."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    losses: list[float] = []
    seed = setup.spec.seed
    reference = bf16 or kernel_masks
    masked = 0
    if kernel_masks:
        from kernel_masks import use_kernel_masks

        masked = use_kernel_masks(setup.model)

    class Observe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_begin(self, args, state, control, **kwargs):
            reseed(seed, state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class StopAfterLossSteps(TrainerCallback):
        """A loss reference only feeds the loss check: stop it after ``loss_steps``
        (``max_steps`` stays the full run's, so the LR schedule is the same)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= cfg.loss_steps:
                control.should_training_stop = True

    class CountingTrainer(Trainer):
        """Trainer that only takes each batch's token counts (read by the collator, on the
        CPU) out of the batch before training on it."""

        def training_step(self, model, inputs, *args, **kwargs):
            clock.add_counts(inputs.pop(COUNTS))
            return super().training_step(model, inputs, *args, **kwargs)

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        """The Trainer's collator, plus the batch's token counts as plain ints: read here,
        before the Trainer moves the batch to its device, where reading them would wait for
        the device (and in the dataloader's worker processes, where they are made)."""
        batch = collator(features)
        batch[COUNTS] = clock.counts(batch)
        return batch

    model, tokenizer = setup.model, setup.loaded.tokenizer
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, padding=True,
                                      label_pad_token_id=-100)
    dataset = ExampleDataset(ordered_examples(setup))
    with tempfile.TemporaryDirectory(prefix="throughput-trainer-") as out_dir:
        args = trainer_arguments(cfg, setup, out_dir, tuned, bf16)
        trainer = CountingTrainer(model=model, args=args, train_dataset=dataset,
                                  data_collator=counting_collator, processing_class=tokenizer,
                                  callbacks=[Observe()]
                                  + ([StopAfterLossSteps()] if reference else []))
        trainer.train()
    clock.end()
    optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                     else trainer.optimizer).__name__
    precision = ("bf16 autocast (fp32 weights)"
                 if bf16 or (tuned and tuned_uses_bf16(cfg.device)) else "fp32")
    return {"losses": losses,
            "precision": precision + (", peftbench's LoRA dropout masks" if kernel_masks
                                      else ""),
            **({"kernel_mask_dropouts": masked} if kernel_masks else {}),
            "optimizer": f"{getattr(args.optim, 'value', args.optim)} ({optimizer})",
            "warmup_steps": warmup_steps(setup.spec),
            "training_arguments": {k: str(v) for k, v in args.to_dict().items()
                                   if k in TRAINER_ARGS_SHOWN}}


COUNTS = "_throughput_counts"  # batch key of the collator's token counts (see run_trainer)

TRAINER_ARGS_SHOWN = {
    "per_device_train_batch_size", "max_steps", "learning_rate", "warmup_steps",
    "lr_scheduler_type", "optim", "weight_decay", "max_grad_norm", "bf16", "fp16",
    "train_sampling_strategy", "dataloader_num_workers", "dataloader_pin_memory",
    "logging_steps", "seed", "use_cpu", "disable_tqdm",
}


# --------------------------------------------------------------------------- entry


def use_threads(cfg: WorkerConfig) -> None:
    """torch's threads: ``cfg.threads``, or every usable core; recorded in ``cfg``."""
    import torch

    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    cfg.threads = torch.get_num_threads()


def run_worker(cfg: WorkerConfig) -> dict[str, Any]:
    """Build, train and measure one configuration; the result is JSON-ready."""
    import torch

    from peftbench.training.memory import PeakMemory

    if cfg.variant not in ALL_VARIANTS:
        raise SystemExit(f"unknown variant {cfg.variant!r}: one of {', '.join(ALL_VARIANTS)}")
    use_threads(cfg)
    rss = RssSampler()
    rss.start()
    tick = time.perf_counter()
    setup = build(cfg)
    params = describe_params(setup.model)
    clock = StepClock(cfg, virtual_tokens(setup.model), setup.loaded.is_encoder_decoder, rss)
    setup_seconds = time.perf_counter() - tick
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "peftbench": lambda: run_peftbench(cfg, setup, clock),
        "trainer_default": lambda: run_trainer(cfg, setup, clock, tuned=False),
        "trainer_tuned": lambda: run_trainer(cfg, setup, clock, tuned=True),
        REFERENCE: lambda: run_trainer(cfg, setup, clock, tuned=False, bf16=True),
        MASKED: lambda: run_trainer(cfg, setup, clock, tuned=False, kernel_masks=True),
    }
    tick = time.perf_counter()
    details = probe_gradient(cfg, setup) if cfg.gradient_out else runners[cfg.variant]()
    train_seconds = time.perf_counter() - tick
    rss.stop()
    result = {
        "config": asdict(cfg),
        "model": setup.loaded.name,
        "encoder_decoder": setup.loaded.is_encoder_decoder,
        "lr": setup.lr,
        "total_steps": setup.spec.max_steps,
        "train_examples": len(setup.train_set),
        "notes": setup.notes,
        "params": params,
        "virtual_tokens": clock.virtual_tokens,
        "setup_seconds": setup_seconds,
        "train_wall_seconds": train_seconds,
        "peak_rss_mb": lifetime_peak_rss_mb(),
        # on a GPU, what peftbench's runs record as peak_gpu_mb; None on CPU (RSS says it)
        "peak_device_mb": PeakMemory.peak_gpu_mb(torch.device(cfg.device)),
        "train_peak_rss_mb": round(rss.train_peak / 2**20, 1),
        **({} if cfg.gradient_out else clock.summary()),
        **details,
    }
    result["losses"] = result.get("losses", [])[: max(cfg.loss_steps, 0)]
    if clock.op_counts is not None:
        result["op_counts"] = clock.op_counts
    if clock.profile_table is not None:
        result["profile_table"] = clock.profile_table
        result["profile_by_shape"] = clock.profile_by_shape
    return result
