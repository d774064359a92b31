"""Ahead-of-time compile every fastppo kernel for sm_80 and sm_90, without a GPU.

    python -m fastppo.kernels.compile_check [--arch 80 90] [--only NAME]

Each kernel module lists, in ``COMPILE_SPECS``, the argument signatures and block sizes its launcher
can pick (every autotune config included). This compiles each one with
``triton.compile(..., target=GPUTarget("cuda", cc, 32))``, reads the cubin's resource usage with the
``cuobjdump`` that ships inside Triton, prints a table (kernel, arch, registers, shared memory,
local memory) and exits non-zero on a compile failure or any spill (local memory or stack > 0):
a kernel that spills on the GPU is a slow kernel, and we want to know before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

# Modules holding kernels. Each exposes COMPILE_SPECS: list[fastppo.kernels._jit.CompileSpec].
KERNEL_MODULES = (
    "fastppo.kernels.policy_loss",
    "fastppo.kernels.value_loss",
    "fastppo.kernels.kl",
    "fastppo.kernels.gae",
    "fastppo.kernels.logprobs",
    "fastppo.kernels.linear_logprobs",
)


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(spec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "shared": max(shared, compiled.metadata.shared), "local": local}


def _job(modname: str, idx: int, cc: int) -> tuple:
    """Compile spec ``idx`` of ``modname`` for sm_``cc``; one table row, status last."""
    spec = importlib.import_module(modname).COMPILE_SPECS[idx]
    try:
        r = compile_one(spec, cc)
        status = "SPILL" if r["local"] > 0 or r["stack"] > 0 else "ok"
    except Exception as e:  # report every failure, then exit non-zero
        r = {"regs": "-", "shared": "-", "local": "-", "stack": "-"}
        status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return (spec.kernel.__name__, spec.label, f"sm_{cc}", r["regs"], r["shared"], r["local"], r["stack"], status)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    p.add_argument("--only", default=None, help="only kernels whose name contains this string")
    p.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: one per CPU core)")
    args = p.parse_args(argv)

    # Compile mode, even on a machine without a GPU. Triton fixes the mode when a kernel is decorated,
    # so this must happen before any kernel module is imported: run this as a fresh process.
    os.environ["FASTPPO_TRITON_COMPILE"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its current default
    jit_mod = sys.modules.get("fastppo.kernels._jit")
    if jit_mod is not None and jit_mod.INTERPRET:
        raise SystemExit("compile_check: kernels were already imported in interpreter mode; run `python -m fastppo.kernels.compile_check` in a fresh process")

    jobs = []
    for modname in KERNEL_MODULES:
        for idx, spec in enumerate(importlib.import_module(modname).COMPILE_SPECS):
            if args.only and args.only not in spec.kernel.__name__:
                continue
            jobs += [(modname, idx, cc) for cc in args.arch]
    # Compiles are independent and CPU-bound (ptxas): spread them over the cores.
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(jobs)))
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            rows = list(pool.map(_job, *zip(*jobs))) if jobs else []
    else:
        rows = [_job(*j) for j in jobs]
    failures = sum(row[-1] != "ok" for row in rows)
    header = ("kernel", "config", "arch", "regs", "shared", "local", "stack", "status")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print(f"{len(rows)} compiled, {failures} failed or spilled")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
