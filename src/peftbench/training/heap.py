"""A steady C heap for CPU training: glibc's mmap threshold fixed, low, not adaptive.

glibc serves requests above its mmap threshold with their own mappings, which go back to the
system when freed; smaller ones come from the heap, where a freed block leaves a hole that
only a block of its size or smaller can reuse. The threshold starts at 128 KiB and adapts:
each time a mapped block is freed it rises to that block's size, so after the first step
most activations (a few MB each) came from the heap. Activations kept for the backward and
temporaries freed within the layer alternate there, and the holes grew the heap far above
what was live: one all-linear LoRA step on SmolLM2 had 1.09 GB live in a 1.72 GB heap. How
the holes fell also varied between runs of the same command, so the peak RSS did (about
1.95 or 2.5 GB for that run, also with the threshold fixed at 32 MiB).

Fixed at 2 MiB, every activation of a SmolLM2 batch (2.5 MB and up) gets its own mapping:
the heap stayed within 13 % of the live memory and the peak RSS at 1.98-2.03 GB in all 6
runs. Step times after the first were within 3 % of the heap's in two of three paired runs
and the benchmark's LoRA rate did not drop (``benchmarks/README.md``). Only glibc on
Linux is changed, and not when the user set a threshold through the environment
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

#: mallopt parameter (malloc.h)
_M_MMAP_THRESHOLD = -3
#: blocks of at least this many bytes get their own mapping
MMAP_THRESHOLD = 2 * 2**20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def steady_heap() -> int:
    """Fix glibc's mmap threshold for this process (once); returns the mmap threshold in
    MiB, or 0 where nothing was changed (not glibc, or set by the user)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return 0
    if any(name in os.environ for name in _USER_SETTINGS):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return 0
    return MMAP_THRESHOLD // 2**20 if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) else 0
