"""The project's tolerance rule for kernels: |kernel - fp64| <= 2 * |torch same dtype - fp64| + atol."""

from __future__ import annotations

import torch


def assert_within_rule(kernel: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, *, atol: float, name: str = "output"):
    """Elementwise check of the tolerance rule. ``torch_same`` is the PyTorch computation in the
    kernel's input dtype (the error budget a user already accepts), ``ref64`` the float64 truth."""
    kernel, torch_same, ref64 = (t.detach().to("cpu", torch.float64) for t in (kernel, torch_same, ref64))
    assert kernel.shape == ref64.shape == torch_same.shape, (name, kernel.shape, torch_same.shape, ref64.shape)
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values in the kernel output"
    err_k = (kernel - ref64).abs()
    bound = 2 * (torch_same - ref64).abs() + atol
    bad = err_k > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements break |kernel-fp64| <= 2|torch-fp64| + {atol}; "
            f"first at {idx}: kernel={kernel[tuple(idx)].item():.8g} fp64={ref64[tuple(idx)].item():.8g} "
            f"torch={torch_same[tuple(idx)].item():.8g}; max excess {(err_k - bound).max().item():.3g}"
        )
