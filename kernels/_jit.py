"""The ``jit`` decorator every fastppo kernel and device helper uses instead of ``triton.jit``.

Triton decides at decoration time whether a function is compiled (``JITFunction``) or run by its
numpy interpreter (``InterpretedFunction``), and a compiled kernel cannot call an interpreted helper
or the reverse, so the choice is made once, for all our kernels, when this module is imported:

* ``TRITON_INTERPRET=1`` in the environment: interpreter (CPU tensors; CUDA tensors are copied);
* ``FASTPPO_TRITON_COMPILE=1``: compiled, even with no GPU (``compile_check`` compiles ahead of time);
* otherwise: compiled when a CUDA device is present, interpreted when none is, so that
  ``FASTPPO_BACKEND=triton`` works on a CPU-only machine without further setup.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

_env = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
_force_compile = os.environ.get("FASTPPO_TRITON_COMPILE", "0") == "1"

INTERPRET: bool = _env or (not _force_compile and not torch.cuda.is_available())


def jit(fn=None, **kwargs):
    """``triton.jit`` with the mode chosen above. Usable bare (``@jit``) or with ``triton.jit``'s options."""

    def wrap(f):
        if INTERPRET:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(f, **kwargs)
        return triton.jit(f, **kwargs)

    return wrap if fn is None else wrap(fn)


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel at one launch configuration.

    kernel: the jitted kernel (``fastppo.kernels._jit.jit``).
    signature: Triton type of each runtime argument, e.g. ``{"X": "*bf16", "n": "i32"}``.
    constexprs: values of the ``tl.constexpr`` arguments (block sizes, flags).
    num_warps / num_stages: as the launcher passes them.
    label: a short tag for the table (e.g. ``"bf16 BLOCK=4096"``).
    divisible: ``None`` compiles with nothing known about the arguments (odd sizes, e.g. V = 50257).
        A tuple of integer argument names compiles the specialization Triton's launcher picks at run
        time when every pointer is 16-byte aligned (torch's allocations are) and these integers are
        multiples of 16 (the shapes of our goals: V = 151936, H = 896 or 4096, N = 8192). That is
        the variant whose loads can be vectorized, so it is the one the speed depends on.
    min_load_bits: the widest global load (or async copy) in the SASS must be at least this wide:
        128 = 16-byte vector loads, what a memory-bound kernel needs to reach full bandwidth.
    tensor_cores: the SASS must use matrix instructions (``HGMMA`` on sm_90, ``HMMA`` on sm_80).
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible: tuple | None = None
    min_load_bits: int = 0
    tensor_cores: bool = False
