"""Peak memory of the run: resident set size of this process, and GPU memory."""

from __future__ import annotations

import resource

import psutil
import torch


class PeakMemory:
    """Tracks the highest RSS seen at sample points and the process's lifetime peak."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss

    def sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def peak_rss_mb(self) -> float:
        # ru_maxrss (KiB on Linux) catches peaks between samples
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return round(max(self._peak, lifetime) / 2**20, 1)

    @staticmethod
    def peak_gpu_mb(device: torch.device) -> float | None:
        if device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
