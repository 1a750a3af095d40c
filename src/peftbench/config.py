"""RunSpec: the resolved, validated description of one fine-tuning run, and its hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields that say *where* or *how* things run, not *what* is computed: left out of the run
# identity (recorded in every result's config all the same).
_NON_IDENTITY_FIELDS = frozenset({"data_dir", "device", "compile"})


class RunSpec(BaseModel):
    """Everything that determines one run. Two equal specs compute the same thing, up to
    what ``auto`` leaves to the machine: the device and, with ``precision: auto``, bf16 or
    fp32 (each result records the precision it used, ``run.precision``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="model name (see `peftbench models`), Hub "
                       "id or local dir")
    task: str = Field(min_length=1, description="task name (see `peftbench tasks`) or path to "
                      "a task YAML")
    method: str = Field(min_length=1, description="fine-tuning method (see `peftbench methods`)")
    method_args: dict[str, Any] = Field(default_factory=dict)
    train_size: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="torch's seed range")
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    lr: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    eval_every: int | None = Field(default=None, ge=1, description="steps between validations")
    num_evals: int = Field(default=8, ge=1, description="validations per run if eval_every unset")
    max_eval_examples: int | None = Field(default=None, ge=1)
    max_source_length: int = Field(default=256, ge=8)
    max_target_length: int = Field(default=128, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the hardware computes it natively, else fp32")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the training forward")
    data_dir: str | None = None

    @field_validator("train_size", "seed", "max_steps", "epochs", "lr", "batch_size",
                     "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
                     "eval_every", "num_evals", "max_eval_examples", "max_source_length",
                     "max_target_length", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would take true for 1
            raise ValueError("expected a number, not true/false")
        return value

    @field_validator("method_args")
    @classmethod
    def _json_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        json.dumps(value)  # must be serialisable to be hashed and stored
        return value

    def identity(self) -> dict[str, Any]:
        """The fields that define what is computed (paths and device left out), with the
        method's arguments and learning rate *resolved*: a run that relied on a default is
        a different run once that default changes, so a store never counts it as done."""
        from peftbench.errors import UsageError
        from peftbench.methods import get_method  # torch and peft: not at import time

        fields = {k: v for k, v in self.model_dump().items() if k not in _NON_IDENTITY_FIELDS}
        fields["task"] = task_identity(self.task, self.data_dir)
        fields["model"] = model_identity(self.model)
        try:
            method = get_method(self.method)
            fields["method_args"] = method.resolve_args(self.method_args)
        except UsageError:  # unknown method or argument: reported when the run starts
            return fields
        fields["lr"] = self.lr if self.lr is not None else method.default_lr
        return fields

    def run_hash(self) -> str:
        """A short stable hash of :meth:`identity`: the run's id in results stores."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_identity(task: str, data_dir: str | None = None) -> str:
    """A built-in task's name; for a task file, its resolved path, content hash and the hash
    of the data files it reads (beside it, else in ``data_dir``): the same file spelled
    differently (relative, absolute) is the same run; an edited task file, rewritten data,
    other data found through ``data_dir`` or a link, and a copy elsewhere are other runs."""
    from peftbench.tasks.user import data_files_fingerprint

    if not task.lower().endswith((".yaml", ".yml")):
        return task
    path = Path(task).expanduser()
    try:
        content = path.read_bytes()
    except OSError:  # reported when the run starts
        return task
    identity = f"{path.resolve()}#sha256:{hashlib.sha256(content).hexdigest()}"
    data = data_files_fingerprint(path, data_dir)
    return identity if data is None else f"{identity}#data:{data}"


def model_identity(model: str) -> str:
    """A built-in name or Hub id as given; for a local model directory, its resolved path
    and the sha256 of its weight files: the same folder spelled differently (relative,
    absolute, through a link) is the same run, and new weights saved into it make another
    run. The hash is memoised per file size and modification time (``dir_fingerprint``)."""
    from peftbench.models.fingerprint import dir_fingerprint
    from peftbench.models.registry import resolve_model_kind

    if resolve_model_kind(model) != "local":
        return model
    path = Path(model).expanduser()
    try:
        return f"{path.resolve()}#weights:{dir_fingerprint(path)}"
    except OSError:  # unreadable: reported when the run starts
        return model


def compact(value: object) -> str:
    """A method argument as typed on the command line: ``[q_proj,v_proj]``, ``-6:``."""
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)
