"""The one place where an op chooses its implementation: a Triton kernel or the PyTorch reference.

Every public op validates its arguments, then calls :func:`dispatch`, which applies the same rules
to all of them, in this order:

1. **float64** inputs take the reference: the kernels compute in float32, and float64 is what
   ``gradcheck`` and the tests' ground truths run in;
2. **empty** inputs take the reference: there is nothing to launch, and the reference returns
   empty outputs still attached to the autograd graph;
3. otherwise the **backend** decides (:func:`fastppo._backend.use_triton`: ``auto`` runs the kernel
   on CUDA tensors, ``torch``/``triton`` force one side, and a forced ``triton`` that cannot run on
   these tensors raises a clear error).

Each call runs inside a ``record_function("fastppo.<op>")`` range while a profiler is recording,
so a trace shows our ops by name (no cost otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any

import torch

from fastppo._backend import use_triton


def kernel_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on ``tensors`` (``None`` entries ignored) runs its Triton kernel (rules above)."""
    ts = [t for t in tensors if t is not None]
    if any(t.dtype == torch.float64 for t in ts) or any(t.numel() == 0 for t in ts):
        return False
    return use_triton(*ts)


def _profiled(op: str):
    # record_function costs a few microseconds even when nothing records: only pay it under a profiler
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"fastppo.{op}")
    return contextlib.nullcontext()


def dispatch(op: str, kernel: str | None, reference: Callable, *args: Any, **kwargs: Any):
    """Run ``op`` as ``kernel(*args, **kwargs)`` or ``reference(*args, **kwargs)``.

    ``kernel`` is ``"module:function"`` inside :mod:`fastppo.kernels`, imported only when it runs
    (so ``import fastppo`` never imports Triton), or ``None`` for an op that has no kernel (it still
    gets its profiler range). The tensors among ``args`` decide (module docstring).
    """
    with _profiled(op):
        if kernel is not None and kernel_applies(*(a for a in args if isinstance(a, torch.Tensor))):
            module, name = kernel.split(":")
            return getattr(importlib.import_module(f"fastppo.kernels.{module}"), name)(*args, **kwargs)
        return reference(*args, **kwargs)
