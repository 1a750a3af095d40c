"""A run of a sweep: its spec and the folder its adapter and result.json go to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftbench.config import RunSpec, compact


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    out_dir: Path

    @property
    def run_hash(self) -> str:
        return self.spec.run_hash()

    @property
    def label(self) -> str:
        """``lora          tiny-random-llama/toy_cls n=64 s=0``"""
        spec = self.spec
        size = "all" if spec.train_size is None else str(spec.train_size)
        model = Path(spec.model).name if "/" in spec.model else spec.model
        return f"{spec.method:<13} {model}/{Path(spec.task).stem} n={size} s={spec.seed}"

    @property
    def long_label(self) -> str:
        """:attr:`label` with the method arguments and the learning rate the suite sets
        (what tells variants of one method apart)."""
        args = " ".join(f"{key}={compact(value)}"
                        for key, value in self.spec.method_args.items())
        lr = self.spec.lr
        return self.label + (f" {args}" if args else "") + (f" lr={lr:g}" if lr is not None
                                                            else "")


def plan_runs(specs: list[RunSpec], out_root: Path) -> list[PlannedRun]:
    """Each run in ``out_root/<run_hash>/`` (an absolute path: Ray workers may run elsewhere)."""
    root = Path(out_root).expanduser().resolve()
    return [PlannedRun(spec, root / spec.run_hash()) for spec in specs]
