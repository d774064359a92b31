"""One timing method for every benchmark row, and the memory each call adds.

* CUDA, as ``triton.testing.do_bench``: the first call warms up (compilation, graph capture), a few
  calls estimate the time per call, then calls fill ``warmup_ms``, then each of the timed reps
  (as many as fill ``rep_ms``, within ``[min_reps, max_reps]``) first zeroes a 256 MiB buffer to
  flush the L2 cache, then runs between two CUDA events. Result: the median of the reps.
* CPU: the same schedule timed with ``time.perf_counter`` (no cache flush), on the torch threads
  the process is configured with (``--threads``).

Peak memory is what the timed calls add on top of what was allocated before them (their inputs
included there): ``torch.cuda.max_memory_allocated`` on CUDA. On the CPU: the growth of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc told
(``mallopt``) to map every allocation of 1 MiB or more afresh and to unmap it when freed, so that
memory freed by an earlier call cannot hide a later call's peak; small allocations served from the
heap are not seen. Where that cannot be set up (not Linux with glibc) the CPU figure is None. The
setting stays for the process: CPU timings then include the page faults of fresh large buffers,
for every implementation alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any L2 (H100/H200: 50/60 MB), as triton.testing.do_bench


@dataclass(frozen=True)
class TimerSettings:
    """How long to warm up and to time one row."""

    warmup_ms: float
    """Time spent in untimed calls after the first call (which compiles / captures graphs)."""
    rep_ms: float
    """Time the timed calls should fill; 0 means exactly ``min_reps`` calls (for slow calls)."""
    min_reps: int
    """Fewest timed calls: the median of fewer than 3 does not resist one descheduled call."""
    max_reps: int
    """Most timed calls, however fast the call."""


CUDA_TIMER = TimerSettings(warmup_ms=25.0, rep_ms=100.0, min_reps=5, max_reps=1000)  # do_bench's defaults
CPU_TIMER = TimerSettings(warmup_ms=50.0, rep_ms=500.0, min_reps=5, max_reps=200)
QUICK_CPU_TIMER = TimerSettings(warmup_ms=10.0, rep_ms=60.0, min_reps=3, max_reps=30)
SLOW_CALL_TIMER = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)  # seconds-long calls (generate)


@dataclass(frozen=True)
class Timing:
    """The result of :func:`measure`."""

    time_ms: float
    """Median of the timed calls, milliseconds."""
    reps: int
    """Number of timed calls."""
    peak_mem_mb: float | None
    """Memory the timed calls added at their peak, MiB (None where it cannot be read)."""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _exact_large_allocations() -> bool:
    """Make glibc map allocations >= 1 MiB afresh and return them when freed (True if it could)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 20)) and bool(mallopt(m_trim_threshold, 1 << 20))


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory added between ``start()`` and ``stop()``, MiB."""

    def __init__(self, device: str):
        self.device = device
        self.base = None

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if not _exact_large_allocations():
            self.base = None
            return
        try:  # Linux: "5" resets VmHWM to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None
            return
        rss = _status_kib("VmRSS")
        self.base = None if rss is None else rss * 1024

    def stop(self) -> float | None:
        if self.base is None:
            return None
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = _status_kib("VmHWM")
            if hwm is None:
                return None
            peak = hwm * 1024
        return max(0, peak - self.base) / 2**20


def measure(fn: Callable[[], object], device: str, settings: TimerSettings) -> Timing:
    """Time ``fn()`` on ``device`` ("cuda" or "cpu") as the module docstring says."""
    fn()  # compiles, captures, allocates caches: never timed
    sync(device)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if device == "cuda" else None
    reps = settings.min_reps
    if settings.rep_ms > 0 or settings.warmup_ms > 0:  # else a fixed count: no estimate (slow calls)
        estimate_ms = max(_estimate_ms(fn, device), 1e-3)
        if settings.rep_ms > 0:
            reps = int(min(settings.max_reps, max(settings.min_reps, settings.rep_ms / estimate_ms)))
        for _ in range(int(settings.warmup_ms / estimate_ms)):
            fn()
        sync(device)

    memory = _PeakMemory(device)
    memory.start()
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = memory.stop()
    return Timing(time_ms=statistics.median(times), reps=reps, peak_mem_mb=peak)


def _estimate_ms(fn: Callable[[], object], device: str) -> float:
    """Milliseconds per call: the median of 3 on CUDA (events), one call on the CPU."""
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(3)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)
