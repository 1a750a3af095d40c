"""A steady C heap for CPU training: glibc maps no block of its own, and keeps the heap's free
top.

glibc serves requests above its mmap threshold with their own mappings, which go back to the
system when freed; smaller ones come from the heap, whose free top it returns to the system
once above the trim threshold. Both start low (128 KiB) and adapt. Every page a process gets
back from the system is zeroed on first touch, and on the 2-core VM these numbers come from
a page fault cost about 20 us of system time.

An earlier version fixed the mmap threshold at 2 MiB, so that the heap's holes could not
grow it far above what was live (an older all-linear LoRA step on SmolLM2 once had 1.09 GB
live in a 1.72 GB heap). But then each step's blocks of 2 MiB and more that found no hole
of their size were mapped afresh, and with the trim threshold left at 128 KiB the heap's
top went back too. On SmolLM2 (batch 16), against that version:

- all-linear LoRA, 100 steps: page faults after the first step 1.26 million (in 37 steps)
  -> 83 thousand (in 4), system time 9.6 -> 2.7 s, steps 4-100 62.6 -> 54.9 s (x1.14),
  peak RSS 1853 -> 1938 MB; in the throughput benchmark's 33 steps, steps 4-33 22.6 ->
  17.4 s;
- full fine-tuning, 33 steps: page faults 4.1 -> 0.21 million, system time 20.7 -> 6.3 s,
  steps 4-33 38.2 -> 26.8 s (x1.42), peak RSS 3522 -> 3642 MB. A 32 MiB mmap threshold
  (glibc's largest) left the vocabulary-sized blocks mapped: 2.2 million faults, 36.9 s.

So no block is mapped (``M_MMAP_MAX`` 0) and the heap's free top goes back to the system
only above mallopt's largest trim threshold (2 GiB): what the widest batch (the first
step, :mod:`~peftbench.training.batches`) took serves the later steps. Only glibc on Linux
is changed, after the model is loaded, and not when the user set a malloc setting through
the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: the heap's free top goes back to the system only above this: mallopt's largest (an int)
TRIM_THRESHOLD = 2**31 - 1
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                  "GLIBC_TUNABLES")


@functools.cache
def steady_heap() -> int:
    """Keep this process's glibc heap steady (once): no block mapped of its own, the free
    top kept up to 2 GiB; returns 1, or 0 where it was not applied (not glibc, a malloc
    setting from the user, or a setting glibc refused)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return 0
    if any(name in os.environ for name in _USER_SETTINGS):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return 0
    return int(bool(libc.mallopt(_M_MMAP_MAX, 0))
               and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
