"""Backend selection: which implementation (Triton kernels or the PyTorch reference) runs an op.

``FASTPPO_BACKEND`` (read at every call) or the :func:`use_backend` context manager picks one of

* ``"auto"`` (default): Triton for CUDA tensors, the PyTorch reference otherwise;
* ``"torch"``: always the PyTorch reference;
* ``"triton"``: always the Triton kernels. On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1``), which is how the test-suite runs the kernels on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastppo_backend", default=None)


def _validate(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``FASTPPO_BACKEND``, else ``"auto"``."""
    name = _override.get()
    if name is not None:
        return name
    return _validate(os.environ.get("FASTPPO_BACKEND", "auto").strip().lower() or "auto", "FASTPPO_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (``"auto"``, ``"torch"`` or ``"triton"``)."""
    token = _override.set(_validate(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreting() -> bool:
    """Whether fastppo's Triton kernels run under Triton's interpreter (CPU tensors)."""
    from fastppo.kernels._jit import INTERPRET

    return INTERPRET


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide, for the op about to run on ``tensors``, whether it goes to the Triton kernels.

    Raises a clear error when ``"triton"`` is forced but cannot run on these tensors.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("FASTPPO_BACKEND=triton but triton cannot be imported on this machine")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "FASTPPO_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing fastppo (or move the tensors to a CUDA device)"
        )
    return True
