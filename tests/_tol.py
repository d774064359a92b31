"""The project's tolerance rule for kernels: |kernel - fp64| <= 2 * |torch same dtype - fp64| + atol.

Also the layouts the kernel tests use and the device helpers for running the Triton backend on a GPU
(``FASTPPO_TEST_CUDA=1``) while the float64 references stay on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from fastppo._backend import interpreting


def assert_within_rule(
    kernel: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, *, atol: float, name: str = "output"
):
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
        wide = torch.full((*x.shape[:-1], x.shape[-1] + 3), 7.0 if x.is_floating_point() else 1, device=x.device).to(
            x.dtype
        )
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    if layout == "transpose":  # token dim no longer has stride 1
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "permute":  # leading dims that do not merge: reshape(-1, T) must copy
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def kernel_device(backend: str = "triton") -> torch.device:
    """The device a test runs ``backend`` on: CUDA for the Triton backend when the kernels are compiled
    (``FASTPPO_TEST_CUDA=1`` on a GPU machine, where conftest leaves ``TRITON_INTERPRET`` unset and
    ``use_backend("triton")`` refuses CPU tensors), else the CPU (the torch backend always; the Triton
    kernels under the interpreter)."""
    if backend == "triton" and torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


def to_kernel_device(*xs, backend: str = "triton") -> tuple:
    """``xs`` with every CPU tensor moved to :func:`kernel_device` (``backend``): same values, dtype and
    strides. Anything else (None, numbers, tensors on other devices such as ``meta``) is returned as is.
    On the CPU every tensor is returned itself."""
    dev = kernel_device(backend)
    return tuple(_move(x, dev) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x for x in xs)


def _move(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    # ``.to`` keeps the strides of dense layouts (contiguous, "transpose", "permute") but makes a padded
    # one ("slice") contiguous: refuse, so that a kernel test cannot silently lose its layout. Move the
    # dense tensor, then apply relayout on the kernel's device.
    y = x.to(dev)
    if x.numel() > 1 and y.stride() != x.stride():
        raise ValueError(
            f"moving a tensor of strides {x.stride()} to {dev} changes its layout; move it before relayout"
        )
    return y


def to_cpu(obj):
    """Tensors in ``obj`` (a tensor, or tuples/lists/dicts of them; None passes) brought back to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def scalar(x):
    return torch.as_tensor(x, dtype=torch.float64).reshape(1)
