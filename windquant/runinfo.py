"""Stage timings and peak memory for run reports (the paper's Table 3 columns)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import time
from contextlib import contextmanager

import torch


def set_threads(n: int | None = None) -> int:
    """Torch threads: ``n``, else ``$WINDQUANT_THREADS``, else every core. Never more than the
    cores: OpenMP spin on busy cores slows small ops by >10x."""
    n = n or int(os.environ.get("WINDQUANT_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it in its arenas otherwise,
    so RSS stays at the load's high-water mark). A no-op where there is no glibc."""
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024


def return_large_frees_to_os() -> None:
    """Serve every allocation of 256 KiB or more with its own mmap, so freeing it returns it to
    the OS at once. glibc otherwise raises this threshold as large blocks are freed and then
    serves them from its heap, where a KV cache grown token by token and a prefill's
    activations stay resident after ``generate()`` returns (measured: 337 → 140 MiB RSS after
    a batch-8 generate through the runtime). Process-wide; a no-op without glibc."""
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        except (OSError, AttributeError):
            pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def peak_gpu_mib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


class Timings(dict):
    """Stage name -> seconds; ``with timings.stage("fit"): ...``. Also keeps, per stage, the
    process's peak RSS when the stage last ended: the stage whose figure jumps set the peak."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peaks: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
            self.peaks[name] = round(peak_rss_mib(), 1)

    def report(self) -> dict:
        return {
            "seconds": {k: round(v, 3) for k, v in self.items()},
            "total_seconds": round(sum(self.values()), 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_rss_after_stage_mib": dict(self.peaks),
            "peak_gpu_mib": peak_gpu_mib(),
        }
