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


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values and shape, other strides."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "slice":  # rows padded by 3: x[..., :T] of a wider tensor
        wide = torch.full((*x.shape[:-1], x.shape[-1] + 3), 7.0 if x.is_floating_point() else 1).to(x.dtype)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    if layout == "transpose":  # token dim no longer has stride 1
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "permute":  # leading dims that do not merge: reshape(-1, T) must copy
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)


def scalar(x):
    return torch.as_tensor(x, dtype=torch.float64).reshape(1)
