"""The device's peaks, measured in the same run as the rows that are put against them.

* ``copy_gbs``: a large device-to-device copy (``dst.copy_(src)``), counting the bytes read plus the
  bytes written: the ceiling of a memory-bound op, which must at least read its inputs and write its
  outputs. Memory-bound rows report ``fraction_of_peak`` against it.
* ``matmul_bf16_tflops``, ``matmul_fp32_tflops``: a large square ``torch.matmul`` (``2 n^3`` flops),
  fp32 with TF32 as the process has it configured (off by default). The linear log-prob rows report
  their fraction against the matmul of their dtype.

On CUDA: 1 GiB copied, ``n = 8192``; on the CPU, small sizes (64-128 MiB, ``n`` = 256-1024) so that
the peaks take a second or two.
"""

from __future__ import annotations

import torch

from fastppo.bench.timing import TimerSettings, measure

PEAK_KEYS = ("copy_gbs", "matmul_bf16_tflops", "matmul_fp32_tflops")
MATMUL_PEAK = {"bfloat16": "matmul_bf16_tflops", "float16": "matmul_bf16_tflops", "float32": "matmul_fp32_tflops"}


def _sizes(device: str, quick: bool) -> tuple[int, dict[str, int]]:
    if device == "cuda":
        return 1 << 30, {"bfloat16": 8192, "float32": 8192}
    if quick:
        return 64 << 20, {"bfloat16": 256, "float32": 512}
    return 128 << 20, {"bfloat16": 512, "float32": 1024}


def copy_gbs(device: str, nbytes: int, settings: TimerSettings) -> float:
    """GB/s of ``dst.copy_(src)`` for ``nbytes``-byte tensors: ``2 * nbytes`` (read + write) per call."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, settings).time_ms
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: str, n: int, dtype: torch.dtype, settings: TimerSettings) -> float:
    """TFLOP/s of an ``[n, n] @ [n, n]`` matmul in ``dtype`` (``2 n^3`` flops per call)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    ms = measure(lambda: a @ b, device, settings).time_ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_peaks(device: str, settings: TimerSettings, *, quick: bool) -> dict[str, float]:
    """``{copy_gbs, matmul_bf16_tflops, matmul_fp32_tflops}`` of ``device`` ("cuda" or "cpu")."""
    nbytes, n = _sizes(device, quick)
    return {
        "copy_gbs": copy_gbs(device, nbytes, settings),
        "matmul_bf16_tflops": matmul_tflops(device, n["bfloat16"], torch.bfloat16, settings),
        "matmul_fp32_tflops": matmul_tflops(device, n["float32"], torch.float32, settings),
    }
