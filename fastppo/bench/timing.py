"""One timing method for every benchmark row, and the memory each call adds.

* CUDA, as ``triton.testing.do_bench``: the first call warms up (compilation, graph capture), a few
  calls estimate the time per call, then calls fill ``warmup_ms``, then each of the timed reps
  (as many as fill ``rep_ms``, within ``[min_reps, max_reps]``) first zeroes a 256 MiB buffer to
  flush the L2 cache, then runs between two CUDA events. Result: the median of the reps.
* CPU: the same schedule timed with ``time.perf_counter`` (no cache flush), on the torch threads
  the process is configured with (``--threads``).

Peak memory is what a call adds on top of what was allocated before it (its inputs included
there). CUDA: ``torch.cuda.max_memory_allocated`` over the timed calls. CPU: one more call, untimed,
in "memory mode": glibc told (``mallopt``) to map every allocation of 1 MiB or more afresh and to
unmap it when freed, and its heap trimmed first, so that memory an earlier call freed cannot hide
this call's peak; the figure is the growth of the process's peak resident set over that call
(``VmHWM``, reset through ``/proc/self/clear_refs``). Small allocations served from the heap are
not seen; where this cannot be set up (not Linux with glibc) the CPU figure is None. The timed
calls run in "timing mode", fixed for the whole run: buffers up to 32 MiB are reused from the heap,
as a long-running process settles to (fresh pages would make page faults the bulk of a CPU time).
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


class _Glibc:
    """glibc's allocator knobs (``<malloc.h>``), where there are: None elsewhere."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.mallopt, self.malloc_trim = libc.mallopt, libc.malloc_trim

    def timing_mode(self) -> None:
        """What a long-running process settles to: buffers up to 32 MiB reused from the heap."""
        self.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)
        self.mallopt(self.M_TRIM_THRESHOLD, 256 << 20)

    def memory_mode(self) -> bool:
        """Buffers of 1 MiB or more mapped afresh and unmapped when freed; the heap trimmed now."""
        ok = bool(self.mallopt(self.M_MMAP_THRESHOLD, 1 << 20)) and bool(self.mallopt(self.M_TRIM_THRESHOLD, 1 << 20))
        self.malloc_trim(0)
        return ok


@functools.cache
def _glibc() -> _Glibc | None:
    try:
        glibc = _Glibc()
    except (OSError, AttributeError):
        return None
    glibc.timing_mode()  # fixed for the whole run, so that every row is timed under the same allocator
    return glibc


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    """Growth of the peak resident set over one call of ``fn``, in memory mode (module docstring)."""
    glibc = _glibc()
    if glibc is None or not glibc.memory_mode():
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM back to the current RSS
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    finally:
        glibc.timing_mode()
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


def measure(fn: Callable[[], object], device: str, settings: TimerSettings) -> Timing:
    """Time ``fn()`` on ``device`` ("cuda" or "cpu") as the module docstring says."""
    if device != "cuda":
        _glibc()
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

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        peak = _cpu_peak_mb(fn)
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
