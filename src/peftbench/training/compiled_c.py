"""Small C files compiled at first use with the system's C compiler, loaded with ctypes.

A kernel here is plain C (no torch headers, so it compiles in about a second) that works on
contiguous buffers passed as pointers. Each source is compiled once per source text, flags,
compiler and CPU into peftbench's cache (``PEFTBENCH_CACHE``) under a temporary name and
renamed, so concurrent workers never load half a file. The flags are tried from the fastest
(``-march=native`` and OpenMP, which then shares torch's OpenMP runtime: same soname) to
plain C99; a flag set that failed is noted in the cache and skipped from then on (delete
the cache's ``kernels`` folder to try again, e.g. after installing OpenMP). Without a
working compiler :func:`load` returns None and the caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

from peftbench.paths import cache_dir

_log = logging.getLogger(__name__)
_COMMON = ("-O3", "-std=gnu99", "-fPIC", "-shared", "-fno-math-errno")
#: flag sets tried in order: the first that compiles is used
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    (*_COMMON, "-march=native", "-fopenmp"),
    (*_COMMON, "-fopenmp"),
    _COMMON,
)


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _machine_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return platform.machine() + "\n".join(dict.fromkeys(lines))


def build_library(source: Path, folder: Path | None = None,
                  defines: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into ``folder`` (default: the cache) unless a build of this source
    by this compiler for this machine is there; returns the shared library's path.
    ``defines`` (``-DNAME`` options) are added to every flag set (tests build variants). A flag
    set that failed leaves a ``.failed`` note (the compiler's message) and is not tried
    again, so each new worker process does not pay for it. Raises ``OSError`` /
    ``subprocess.SubprocessError`` when no flag set compiles."""
    compiler = _compiler()
    identity = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    folder = folder or cache_dir("kernels")
    common = [source.read_bytes(), identity.encode(), _machine_identity().encode()]
    for flag_set in FLAG_SETS:
        flags = (*flag_set, *defines)
        key = hashlib.sha256(b"\0".join([*common, " ".join(flags).encode()])).hexdigest()[:16]
        library = folder / f"{source.stem}-{key}.so"
        if library.exists():
            return library
        failed = library.with_suffix(".failed")
        if failed.exists():
            continue
        handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(handle)
        try:
            subprocess.run([*compiler, *flags, "-o", partial, str(source)],
                           capture_output=True, text=True, timeout=300, check=True)
            os.replace(partial, library)
            return library
        except subprocess.CalledProcessError as error:
            failed.write_text(f"{' '.join(error.cmd)}\n{error.stderr}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise OSError(f"{source.name}: no flag set compiles with {' '.join(compiler)} (the "
                  f"compiler's messages are in {folder}/{source.stem}-*.failed)")


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """``source`` compiled and loaded, or None (logged once) when that is not possible."""
    try:
        return ctypes.CDLL(str(build_library(source)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        _log.warning("%s not compiled (%s); using the PyTorch path instead", source.name,
                     str(detail).strip()[:500])
        return None
