"""Runs the cases of the chosen ops and turns each (case, implementation, pass) into a row.

A run is one JSON object: run-level ``schema``, ``date``, ``timestamp``, ``device``,
``device_name``, ``versions``, ``threads``, ``quick``, ``compile``, ``peaks`` (measured first, in the
same process) and ``rows``. A row:

``op``, ``impl``, ``pass`` (``fwd`` / ``fwd+bwd``), ``shape``, ``dtype``, ``device``, ``source``,
``baseline``, ``time_ms`` (median), ``reps``, ``peak_mem_mb``, ``work`` (per call, in the unit's
numerator), ``achieved``, ``unit``, ``peak`` (the key of ``peaks`` it is put against, or None),
``fraction_of_peak`` (``achieved / peaks[peak]``), ``speedup`` (``{baseline impl: its time / this
time}`` over the baselines of the same op, shape, dtype and pass), ``max_abs_diff`` (forward
outputs against the case's reference implementation), and ``skipped`` or ``error`` (a string)
where the row was not timed (its figures are then None).
"""

from __future__ import annotations

import datetime
import functools
import gc
import importlib.metadata
import os
import platform
from collections.abc import Callable

import torch

from fastppo.bench import ops_advantages, ops_e2e, ops_generate, ops_logits, ops_losses
from fastppo.bench.cases import UNIT_SCALE, BenchConfig, Case, Impl, max_abs_diff
from fastppo.bench.peaks import measure_peaks
from fastppo.bench.timing import TimerSettings, measure

SCHEMA = 1
OPS: dict[str, tuple[Callable[[BenchConfig], list[Case]], Callable | None]] = {
    # op: (its cases, a derivation of extra rows from the timed ones)
    "logprobs": (ops_logits.logprobs_cases, None),
    "linear_logprobs": (ops_logits.linear_logprobs_cases, None),
    "policy_loss": (functools.partial(ops_losses.loss_cases, "policy_loss"), None),
    "value_loss": (functools.partial(ops_losses.loss_cases, "value_loss"), None),
    "kl": (functools.partial(ops_losses.loss_cases, "kl"), None),
    "gae": (ops_advantages.gae_cases, None),
    "whiten": (ops_advantages.whiten_cases, None),
    "generate": (ops_generate.generate_cases, ops_generate.decode_step_rows),
    "ppo_step": (ops_e2e.ppo_step_cases, ops_e2e.ppo_step_rows),
}
ALIASES = {  # the names of the former bench/bench_NAME.py scripts, and groups
    "losses": ("policy_loss", "value_loss", "kl"),
    "linear": ("linear_logprobs",),
    "advantages": ("gae", "whiten"),
    "generation": ("generate",),
    "all": tuple(OPS),
}
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "numpy",
    "liger-kernel",
    "cut-cross-entropy",
    "flash-attn",
    "trl",
    "accelerate",
    "datasets",
)


def resolve_ops(names: list[str]) -> list[str]:
    """Op names (and aliases) -> ops, in the order given, without repeats; empty means all."""
    out: list[str] = []
    for name in names or ["all"]:
        key = name.replace("-", "_")
        if key in OPS:
            wanted = (key,)
        elif key in ALIASES:
            wanted = ALIASES[key]
        else:
            choices = ", ".join([*OPS, *ALIASES])
            raise ValueError(f"unknown benchmark {name!r}; choose from {choices}")
        out += [op for op in wanted if op not in out]
    return out


def versions() -> dict[str, str]:
    """Python, fastppo and the installed packages that matter to the figures."""
    import fastppo

    out = {"python": platform.python_version(), "fastppo": fastppo.__version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def new_run(cfg: BenchConfig) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "quick": cfg.quick,
        "compile": cfg.compile,
        "peaks": {},
        "rows": [],
    }


def _row(case: Case, impl: Impl, pass_: str, **figures) -> dict:
    row = {
        "op": case.op,
        "impl": impl.name,
        "pass": pass_,
        "shape": case.shape,
        "dtype": case.dtype,
        "device": case.device,
        "source": impl.source,
        "baseline": impl.baseline,
        "time_ms": None,
        "reps": None,
        "peak_mem_mb": None,
        "work": None,
        "achieved": None,
        "unit": None,
        "peak": None,
        "fraction_of_peak": None,
        "speedup": {},
        "max_abs_diff": None,
    }
    row.update(figures)
    return row


def _why(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def passes_of(case: Case, impl: Impl) -> list[str]:
    return [p for p in case.passes if impl.passes is None or p in impl.passes]


def run_case(case: Case, timer: TimerSettings, peaks: dict, select: Callable[[str], bool] | None = None) -> list[dict]:
    """The rows of one case: every selected implementation, every pass it runs."""
    impls = [i for i in case.impls if select is None or select(i.name)]
    reference = None
    ref_impl = next((i for i in case.impls if i.name == case.reference and i.skip is None), None)
    if ref_impl is not None:
        try:
            reference = case.call(ref_impl, "fwd")()
        except Exception:  # the reference failing shows in its own row
            reference = None
    valid = case.inputs()[case.valid] if case.valid else None
    rows = []
    for impl in impls:
        passes = passes_of(case, impl)
        if impl.skip is not None:
            rows += [_row(case, impl, p, skipped=impl.skip) for p in passes]
            continue
        diff = 0.0 if impl is ref_impl and reference is not None else None
        if reference is not None and impl is not ref_impl and "fwd" in passes:
            try:
                diff = max_abs_diff(case.call(impl, "fwd")(), reference, case.compared, valid)
            except Exception:  # the timed call below fails the same way and reports it
                diff = None
        for p in passes:
            try:
                t = measure(case.call(impl, p), case.device, case.timer or timer)
                work = case.work(case.inputs(), p)
            except Exception as e:  # one implementation failing (OOM, compile error) must not hide the others
                rows.append(_row(case, impl, p, error=_why(e)))
                _free(case.device)
                continue
            achieved = work.amount / (t.time_ms * 1e-3) / UNIT_SCALE[work.unit]
            peak = peaks.get(work.peak) if work.peak else None
            rows.append(
                _row(
                    case,
                    impl,
                    p,
                    time_ms=t.time_ms,
                    reps=t.reps,
                    peak_mem_mb=t.peak_mem_mb,
                    work=work.amount,
                    achieved=achieved,
                    unit=work.unit,
                    peak=work.peak,
                    fraction_of_peak=achieved / peak if peak else None,
                    max_abs_diff=diff,
                )
            )
            _free(case.device)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Fill each row's ``speedup`` over the baselines of its group (op, shape, dtype, pass, device)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["pass"], r["device"]), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r["time_ms"]]
        for r in timed:
            r["speedup"] = {b["impl"]: b["time_ms"] / r["time_ms"] for b in timed if b["baseline"] and b is not r}


def plan(ops: list[str], cfg: BenchConfig) -> list[tuple[str, list[Case]]]:
    """``[(op, its cases)]``: builds no input (cheap, works without the device)."""
    return [(op, OPS[op][0](cfg)) for op in ops]


def run(
    ops: list[str],
    cfg: BenchConfig,
    timer: TimerSettings,
    *,
    select: Callable[[str], bool] | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Measure the peaks, then every op's cases in order; ``on_progress(run)`` after the peaks and
    after each case (to save: an interrupted run keeps what it measured)."""
    result = new_run(cfg)
    result["peaks"] = measure_peaks(cfg.device, timer, quick=cfg.quick)

    def progress(rows: list[dict]) -> None:
        for row in rows:
            result["rows"].append(row)
            if on_row is not None:
                on_row(row)
        add_speedups(result["rows"])
        if on_progress is not None:
            on_progress(result)

    progress([])
    for op, cases in plan(ops, cfg):
        done = len(result["rows"])
        for case in cases:
            progress(run_case(case, timer, result["peaks"], select))
        derive = OPS[op][1]
        if derive is not None:
            progress(derive(cases, result["rows"][done:], result["peaks"]))
        for case in cases:
            case.release()
    return result
