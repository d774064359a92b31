"""Ahead-of-time compile every fastppo kernel for sm_80 and sm_90, without a GPU.

    python -m fastppo.kernels.compile_check [--arch 80 90] [--only NAME]

Each kernel module lists, in ``COMPILE_SPECS``, the argument signatures and block sizes its launcher
can pick (every autotune config included); every module of the package that defines it is compiled,
and a jitted function that no spec reaches (a kernel left out of ``COMPILE_SPECS``) is a failure.
This compiles each spec with
``triton.compile(..., target=GPUTarget("cuda", cc, 32))``, reads the cubin's resource usage with the
``cuobjdump`` that ships inside Triton, prints a table (kernel, arch, registers, shared memory,
local memory, widest global load, matrix instruction) and exits non-zero on a compile failure,
any spill (local memory or stack > 0), more shared memory than a block gets on that GPU, or a hot
kernel whose SASS lost what its speed rests on: 16-byte vector loads for the memory-bound log-prob
kernels, tensor-core instructions (``HGMMA`` on sm_90, ``HMMA`` on sm_80) for the matmul kernels.
A kernel that spills or loads two bytes at a time on the GPU is a slow kernel: we want to know
before a GPU is at hand.

A spec with ``divisible`` compiles the specialization Triton's launcher picks at run time for aligned
pointers and integers that are multiples of 16 (``tt.divisibility = 16``, the ``D`` of its cache key);
one without compiles with nothing known (odd sizes). Both show in the table (``spec`` column).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import importlib
import inspect
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import types

PACKAGE = "fastppo.kernels"


def package_modules() -> list[types.ModuleType]:
    """Every module of the kernels package but this one, imported, sorted by name."""
    pkg = importlib.import_module(PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "compile_check")
    return [importlib.import_module(f"{PACKAGE}.{n}") for n in names]


def kernel_modules() -> list[str]:
    """Names of the modules that define ``COMPILE_SPECS`` (a list of ``fastppo.kernels._jit.CompileSpec``)."""
    return [m.__name__ for m in package_modules() if hasattr(m, "COMPILE_SPECS")]


def _ours(f, module: str = PACKAGE) -> bool:
    """Whether ``f`` is a jitted function (compiled or interpreted) defined in ``module`` or below it."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(f, (JITFunction, InterpretedFunction)) and f.fn.__module__.startswith(module)


def _jitted(mod: types.ModuleType) -> dict:
    """The jitted functions (kernels and device functions) ``mod`` defines, by name."""
    return {name: f for name, f in vars(mod).items() if _ours(f, mod.__name__)}


def _callees(f) -> list:
    """Our jitted functions that jitted ``f``'s source names (``g(...)`` or ``module.g(...)``)."""
    scope = f.fn.__globals__
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(f.fn).lstrip())):
        if isinstance(node, ast.Name):
            found.append(scope.get(node.id))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found.append(getattr(scope.get(node.value.id), node.attr, None))
    return [g for g in found if g is not f and _ours(g)]


def uncompiled(modules: list[types.ModuleType]) -> list[str]:
    """Jitted functions defined in ``modules`` that no ``COMPILE_SPECS`` entry compiles, as a kernel or
    as a device function a compiled kernel calls: a kernel its module forgot to list (or dead code)."""
    todo = [s.kernel for m in modules for s in getattr(m, "COMPILE_SPECS", ())]
    reached = set()
    while todo:
        f = todo.pop()
        if id(f) not in reached:
            reached.add(id(f))
            todo += _callees(f)
    return [f"{m.__name__}.{n}" for m in modules for n, f in _jitted(m).items() if id(f) not in reached]


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# Global loads in SASS: LDG (to registers), LDGSTS (cp.async to shared memory), UTMALDG (TMA bulk copy).
_LOAD = re.compile(r"\b(LDGSTS|UTMALDG|LDG)\b((?:\.[A-Z0-9_]+)*)")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_summary(sass: str) -> dict:
    """Widest global load in bits (a plain ``LDG.E`` is 32) and the matrix instruction used, from SASS text."""
    bits = 0
    for op, mods in _LOAD.findall(sass):
        if op == "UTMALDG":
            bits = max(bits, 128)  # a tensor-memory-accelerator tile copy: wider than any register load
            continue
        widths = [_WIDTH[m] for m in mods.split(".") if m in _WIDTH]
        bits = max(bits, max(widths) if widths else 32)
    mma = "HGMMA" if re.search(r"\bHGMMA\b", sass) else "HMMA" if re.search(r"\bHMMA\b", sass) else "-"
    return {"load_bits": bits, "mma": mma}


def _attrs(spec) -> dict:
    """``tt.divisibility = 16`` on every pointer and on the listed integers, as Triton's launcher sets it."""
    if spec.divisible is None:
        return {}
    names = list(spec.kernel.arg_names)
    unknown = [n for n in spec.divisible if n not in spec.signature]
    if unknown:
        raise ValueError(f"{spec.kernel.__name__}: divisible names unknown arguments {unknown}")
    picked = [
        n for n, ty in spec.signature.items() if n not in spec.ones and (ty.startswith("*") or n in spec.divisible)
    ]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in picked}


def compile_one(spec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs = dict(spec.signature), dict(spec.constexprs)
    for name in spec.ones:  # specialized to the constant 1, as the launcher does for unit strides
        signature[name], constexprs[name] = "constexpr", 1
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=_attrs(spec))
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {
        "regs": reg,
        "stack": stack,
        "shared": max(shared, compiled.metadata.shared),
        "local": local,
        **sass_summary(sass),
    }


# Shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB. Triton only
# finds out at launch ("out of resource: shared memory"), so the check does it here.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def verdict(spec, r: dict, cc: int = 90) -> str:
    """``ok``, or what is wrong with a compiled kernel (spill, too much shared memory, narrow loads,
    no tensor cores)."""
    problems = []
    if r["local"] > 0 or r["stack"] > 0:
        problems.append("SPILL")
    if r["shared"] > SHARED_LIMIT.get(cc, SHARED_LIMIT[80]):
        problems.append(f"SHARED {r['shared']} > {SHARED_LIMIT.get(cc, SHARED_LIMIT[80])}")
    if r["load_bits"] < spec.min_load_bits:
        problems.append(f"NARROW LOADS ({r['load_bits']} < {spec.min_load_bits} bits)")
    if spec.tensor_cores and r["mma"] == "-":
        problems.append("NO TENSOR CORES")
    return ", ".join(problems) or "ok"


def _job(modname: str, idx: int, cc: int) -> tuple:
    """Compile spec ``idx`` of ``modname`` for sm_``cc``; one table row, status last."""
    spec = importlib.import_module(modname).COMPILE_SPECS[idx]
    try:
        r = compile_one(spec, cc)
        status = verdict(spec, r, cc)
    except Exception as e:  # report every failure, then exit non-zero
        r = dict.fromkeys(("regs", "shared", "local", "stack", "load_bits", "mma"), "-")
        status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return (
        spec.kernel.__name__,
        spec.label,
        "-" if spec.divisible is None else "D16",
        f"sm_{cc}",
        r["regs"],
        r["shared"],
        r["local"],
        r["stack"],
        r["load_bits"],
        r["mma"],
        status,
    )


def _run(jobs: list, workers: int) -> list:
    """Table rows of ``jobs`` in their order; one progress line on stderr as each compile finishes."""
    start = time.monotonic()
    rows: list = [None] * len(jobs)
    failed = 0

    def done(i: int, row: tuple) -> None:
        nonlocal failed
        rows[i] = row
        failed += row[-1] != "ok"
        n = sum(r is not None for r in rows)
        print(
            f"compile_check: {n}/{len(jobs)} done, {failed} failed, {time.monotonic() - start:.0f} s "
            f"({row[0]} {row[3]} {row[1]}: {row[-1]})",
            file=sys.stderr,
            flush=True,
        )

    if workers > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(_job, *j): i for i, j in enumerate(jobs)}
            for fut in concurrent.futures.as_completed(futures):
                done(futures[fut], fut.result())
    else:
        for i, j in enumerate(jobs):
            done(i, _job(*j))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    p.add_argument("--only", default=None, help="only kernels whose name contains this string")
    p.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: one per CPU core)")
    args = p.parse_args(argv)

    # Compile mode, even on a machine without a GPU. Triton fixes the mode when a kernel is decorated,
    # so this must happen before any kernel module is imported: run this as a fresh process.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its current default
    jit_mod = sys.modules.get("fastppo.kernels._jit")
    if jit_mod is not None and jit_mod.INTERPRET:
        raise SystemExit(
            "compile_check: kernels were already imported in interpreter mode; "
            "run `python -m fastppo.kernels.compile_check` in a fresh process"
        )

    modules = package_modules()
    missing = uncompiled(modules)
    jobs, names = [], set()
    for mod in modules:
        for idx, spec in enumerate(getattr(mod, "COMPILE_SPECS", ())):
            names.add(spec.kernel.__name__)
            if args.only and args.only not in spec.kernel.__name__:
                continue
            jobs += [(mod.__name__, idx, cc) for cc in args.arch]
    if not jobs:
        what = f"--only {args.only!r} matches no kernel name" if args.only else "no COMPILE_SPECS found"
        print(f"compile_check: {what}; the kernels are: {', '.join(sorted(names)) or 'none'}", file=sys.stderr)
        return 1
    # Compiles are independent and CPU-bound (ptxas): spread them over the cores.
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(jobs)))
    print(f"compile_check: {len(jobs)} compiles on {workers} process(es)", file=sys.stderr, flush=True)
    rows = _run(jobs, workers)
    failures = sum(row[-1] != "ok" for row in rows)
    header = ("kernel", "config", "spec", "arch", "regs", "shared", "local", "stack", "ld_bits", "mma", "status")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print(f"{len(rows)} compiled, {failures} failed, spilled or lost vector loads / tensor cores")
    for name in missing:
        print(f"NOT COMPILED: {name} is reached by no COMPILE_SPECS entry")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
