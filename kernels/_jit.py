"""The ``jit`` decorator every fastppo kernel and device helper uses instead of ``triton.jit``.

Triton decides at decoration time whether a function is compiled (``JITFunction``) or run by its
numpy interpreter (``InterpretedFunction``), and a compiled kernel cannot call an interpreted helper
or the reverse, so the choice is made once, for all our kernels, when this module is imported:

* ``TRITON_INTERPRET=1`` in the environment: interpreter (CPU tensors; CUDA tensors are copied);
* otherwise: compiled (a GPU runs them; with none, ``compile_check`` still compiles them ahead of time).

Interpretation cannot be switched on here for a CPU-only machine: Triton's own library functions
(``tl.sum``, ``tl.max`` ...) are decorated when ``triton.language`` is first imported, under the
``TRITON_INTERPRET`` of that moment, and compiled ones cannot run inside an interpreted kernel. So
``FASTPPO_BACKEND=triton`` on CPU tensors without ``TRITON_INTERPRET=1`` set before the first import
of triton gets a clear error (:func:`fastppo._backend.use_triton`), not an interpreter crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def on_device(t: torch.Tensor):
    """Context for a launch on ``t``'s tensors: Triton launches on the *current* CUDA device, not on
    the tensors' one (a tensor on cuda:1 with cuda:0 current fails to launch). A no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    ones: integer arguments equal to 1 in that run-time specialization (unit strides): Triton's
        launcher makes an integer argument that is 1 a compile-time constant.
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
    ones: tuple = ()
    min_load_bits: int = 0
    tensor_cores: bool = False


def launch_spec(kernel, signature: dict, launch: dict, label: str = "", **expect) -> CompileSpec:
    """The spec of the launch ``kernel[grid](*args, **launch)``: ``launch`` holds the constexprs and
    optionally ``num_warps``/``num_stages`` (Triton's defaults: 4, 3); ``expect``: the other fields."""
    constexprs = dict(launch)
    num_warps, num_stages = constexprs.pop("num_warps", 4), constexprs.pop("num_stages", 3)
    return CompileSpec(kernel, signature, constexprs, num_warps, num_stages, label, **expect)


def streaming_spec(spec: CompileSpec, block: int, num_warps: int, dtype: str) -> CompileSpec:
    """The run-time specialization of an elementwise ``[rows, T]`` kernel on contiguous ``dtype``
    (``"fp32"``, ``"bf16"``, ``"fp16"``) inputs: unit column strides (``s_*_t``, constants 1), row
    strides and ``T`` multiples of 16, aligned pointers. Each thread then holds
    ``block / (32 * num_warps)`` consecutive elements and must load them with one vector load (up to
    16 bytes)."""
    elem_bits = 32 if dtype == "fp32" else 16
    ints = [n for n, ty in spec.signature.items() if ty == "i32"]
    ones = tuple(n for n in ints if n.startswith("s_") and n.endswith("_t"))
    rows = tuple(n for n in ints if n == "T" or (n.startswith("s_") and n.endswith("_r")))
    bits = min(128, block // (32 * num_warps) * elem_bits)
    return dataclasses.replace(spec, divisible=rows, ones=ones, min_load_bits=bits)
