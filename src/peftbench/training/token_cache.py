"""Tokenised text cached on disk, per tokenizer and list of texts.

A sweep trains many runs on the same data with the same tokenizer (every method, every
learning rate of its grid): each run used to tokenise its training examples and evaluation
prompts again (8,000 E2E NLG examples with SmolLM2's tokenizer: 2.20 s one text at a time,
1.32 s in one batched call, 0.14 s from the cache). :class:`TokenCache` tokenises a list
of texts once, in one batched tokenizer call, and stores the ids under a key made of what
the ids depend on: the tokenizer's serialised definition (vocabulary, merges, normaliser,
pre-tokeniser, post-processor, added tokens) plus the Python-side switches that change its
output (``split_special_tokens``, ``add_bos_token``, ``add_eos_token``), the caller's
``kind`` (how the ids are post-processed: truncation limits, peftbench's encoding
version), the tokenizers / transformers versions, and the texts themselves.

Files are ``<cache>/tokens/<key>.safetensors`` (flat int32 ids plus offsets), written to a
temporary file and renamed, so concurrent runs never read half a file; a file that cannot
be read is recomputed and replaced. Tokenizers without a serialisable definition (not
"fast") are not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from peftbench.paths import cache_dir

FORMAT = 1  # bump when the file layout or the key's contents change
# tokenizer attributes outside its serialised definition that change the ids it returns
SWITCHES = ("split_special_tokens", "add_bos_token", "add_eos_token")


@dataclass
class CacheStats:
    """Texts served from files and texts tokenised in this process."""

    cached: int = 0
    tokenised: int = 0


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's whole definition, or None when it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(type(tokenizer).__name__.encode())
    for switch in SWITCHES:
        digest.update(f"\0{switch}={getattr(tokenizer, switch, None)!r}".encode())
    for package in ("tokenizers", "transformers"):
        digest.update(f"\0{package}={metadata.version(package)}".encode())
    return digest.hexdigest()


def open_cache(tokenizer) -> TokenCache:
    """The cache under ``<cache>/tokens``; without files when that folder is unusable."""
    try:
        folder: Path | None = cache_dir("tokens")
    except OSError:
        folder = None
    return TokenCache(folder, tokenizer)


class TokenCache:
    """Ids of lists of texts under ``folder`` (None: no files, tokenise every time)."""

    def __init__(self, folder: Path | None, tokenizer) -> None:
        self.folder = folder
        self.fingerprint = tokenizer_fingerprint(tokenizer) if folder is not None else None
        self.stats = CacheStats()

    def ids(self, kind: str, texts: Sequence[str],
            tokenise: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
        """``tokenise(texts)``, or the stored result of the same call.

        ``kind`` names everything about ``tokenise`` besides the tokenizer (e.g.
        ``"prompt:max=256"``): two different functions must never share a kind.
        """
        if not texts:
            return []
        path = self._path(kind, texts)
        if path is not None:
            stored = _read(path, len(texts))
            if stored is not None:
                self.stats.cached += len(texts)
                return stored
        result = tokenise(list(texts))
        self.stats.tokenised += len(texts)
        if path is not None:
            _write(path, result)
        return result

    def _path(self, kind: str, texts: Sequence[str]) -> Path | None:
        if self.folder is None or self.fingerprint is None:
            return None
        digest = hashlib.sha256(f"{FORMAT}\0{self.fingerprint}\0{kind}\0{len(texts)}".encode())
        for text in texts:
            encoded = text.encode()
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return self.folder / f"{digest.hexdigest()}.safetensors"


def _read(path: Path, count: int) -> list[list[int]] | None:
    """The stored ids, or None if the file is missing, unreadable or of another length."""
    try:
        tensors = load_file(str(path))
        flat, offsets = tensors["ids"].tolist(), tensors["offsets"].tolist()
    except (OSError, SafetensorError, KeyError, RuntimeError):
        return None
    if len(offsets) != count + 1 or offsets[-1] != len(flat):
        return None
    return [flat[offsets[i]:offsets[i + 1]] for i in range(count)]


def _write(path: Path, ids: list[list[int]]) -> None:
    """Store ``ids`` through a temporary file and a rename; a cache that cannot be written
    is skipped, not an error."""
    offsets = [0]
    for row in ids:
        offsets.append(offsets[-1] + len(row))
    flat = [token for row in ids for token in row]
    # a name of this process's own, written by Python (so with the umask's permissions;
    # safetensors' own file writer makes files private)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        data = save({"ids": torch.tensor(flat, dtype=torch.int32),
                     "offsets": torch.tensor(offsets, dtype=torch.int64)})
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except (OSError, SafetensorError):
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
