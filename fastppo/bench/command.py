"""``fastppo bench``: time fastppo's ops against the TRL, OpenRLHF and verl code and the fused peers.

    fastppo bench                                   # every op, the device's full shapes
    fastppo bench --quick --output run.json         # small shapes on the CPU: a smoke run (about a minute)
    fastppo bench logprobs linear_logprobs --device cuda --output bench/results/ --markdown run.md --plot run.png
    fastppo bench losses --list                     # what would run, and what is skipped here and why

Ops: logprobs, linear_logprobs, policy_loss, value_loss, kl, gae, whiten, generate, ppo_step (the
trainer's whole step against TRL 1.12.0's PPOTrainer, when trl is installed); aliases: losses
(policy_loss value_loss kl), advantages (gae whiten), linear, generation, all. ``--output DIR/``
names the file by device and date (``cpu-2026-12-01.json``, ``nvidia-h200-2026-12-01.json``), as
``bench/results/`` keeps them (``{device}`` and ``{date}`` in a file name are filled in the same way);
the JSON is rewritten after every case, so an interrupted run keeps what it measured. Exit status 1 if a
fastppo row failed (a failing baseline is reported in its row and does not fail the run).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import re
import sys
import time

import torch

from fastppo.bench import report
from fastppo.bench.cases import BenchConfig
from fastppo.bench.runner import ALIASES, OPS, passes_of, plan, resolve_ops, run
from fastppo.bench.timing import CPU_TIMER, CUDA_TIMER, QUICK_CPU_TIMER


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastppo bench",
        description="Time fastppo's ops against the TRL, OpenRLHF and verl code and the fused peers.",
        epilog=f"ops: {', '.join(OPS)}; aliases: {', '.join(ALIASES)}",
    )
    p.add_argument("ops", nargs="*", metavar="OP", help="ops or aliases to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes, short timing, no torch.compile peers")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA if present")
    p.add_argument(
        "--output",
        metavar="FILE.json|DIR/",
        help="write the run as JSON; {device} and {date} in the name are filled in, a folder gets {device}-{date}.json",
    )
    p.add_argument("--markdown", metavar="FILE.md", help="write every row as a markdown table")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of the speed-ups (needs matplotlib)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads for CPU runs (default 1: the Python-loop baselines gain nothing from threads, and on "
        "a shared machine multi-threaded ops stall whenever a sibling thread is descheduled; 0: as torch is "
        "configured)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include the torch.compile peers (default: on, off with --quick)",
    )
    p.add_argument(
        "--impls",
        metavar="GLOB[,GLOB...]",
        help="only the implementations matching one of these comma-separated globs ('fastppo-*,trl')",
    )
    p.add_argument("--list", action="store_true", help="print what would run (and what is skipped) and exit")
    return p


def slug(run: dict) -> str:
    """``cpu`` or the GPU's name in lower case with dashes (``nvidia-h200``)."""
    if run["device"] != "cuda":
        return run["device"]
    return re.sub(r"[^a-z0-9]+", "-", run["device_name"].lower()).strip("-")


def output_path(output: str, run: dict) -> pathlib.Path:
    """``output`` with ``{device}`` and ``{date}`` filled in; a folder gets ``{device}-{date}.json``."""
    if output.endswith(("/", os.sep)) or pathlib.Path(output).is_dir():
        output = os.path.join(output, "{device}-{date}.json")
    return pathlib.Path(output.replace("{device}", slug(run)).replace("{date}", run["date"]))


def save(run: dict, path: pathlib.Path) -> None:
    """Write atomically: an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)


def _line(row: dict) -> str:
    head = f"{row['op']:15} {row['shape']:20} {row['dtype']:9} {row['pass']:8} {row['impl']:24}"
    if row.get("skipped"):
        return f"{head} skipped: {row['skipped']}"
    if row.get("error"):
        return f"{head} error: {row['error']}"
    frac = "" if row["fraction_of_peak"] is None else f" {100 * row['fraction_of_peak']:5.1f}% of {row['peak']}"
    return f"{head} {row['time_ms']:10.3f} ms {row['achieved']:10.3g} {row['unit']}{frac}"


def _list(ops: list[str], cfg: BenchConfig, select) -> None:
    for _, cases in plan(ops, cfg):
        for case in cases:
            for impl in case.impls:
                if not select(impl.name):
                    continue
                for p in passes_of(case, impl):
                    why = f"  skipped: {impl.skip}" if impl.skip else ""
                    print(f"{case.op:15} {case.shape:20} {case.dtype:9} {p:8} {impl.name:24}{why}".rstrip())


def main(argv=None) -> int:
    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ops = resolve_ops(a.ops)
    except ValueError as e:
        raise SystemExit(f"fastppo bench: {e}") from None
    if a.device == "cuda" and not torch.cuda.is_available() and not a.list:  # a plan needs no device
        raise SystemExit("fastppo bench: --device cuda, but torch sees no CUDA device")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.threads < 0:
        raise SystemExit(f"fastppo bench: --threads must be >= 0, got {a.threads}")
    if device == "cpu" and a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = BenchConfig(device=device, quick=a.quick, compile=not a.quick if a.compile is None else a.compile)
    patterns = [g.strip() for g in (a.impls or "*").split(",") if g.strip()]

    def select(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

    if a.list:
        _list(ops, cfg, select)
        return 0
    timer = CUDA_TIMER if device == "cuda" else QUICK_CPU_TIMER if a.quick else CPU_TIMER
    t0 = time.perf_counter()
    out_path = None

    def on_progress(result: dict) -> None:
        nonlocal out_path
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        if a.output:
            out_path = out_path or output_path(a.output, result)
            save(result, out_path)

    def on_row(row: dict) -> None:
        print(_line(row), flush=True)

    print(f"fastppo bench: {', '.join(ops)} on {device} ({'quick' if a.quick else 'full'} shapes)", flush=True)
    result = run(ops, cfg, timer, select=select, on_row=on_row, on_progress=on_progress)
    print()
    print(report.header(result))
    print(report.summary_table(result))
    if out_path is not None:
        print(f"wrote {out_path}")
    if a.markdown:
        pathlib.Path(a.markdown).write_text(report.markdown([result], full=True))
        print(f"wrote {a.markdown}")
    if a.plot:
        if report.plot(result, a.plot):
            print(f"wrote {a.plot}")
        else:
            print(f"{a.plot} not written: matplotlib is not installed (pip install 'fastppo[bench]')")
    print(f"{result['wall_s']:.0f} s")
    failed = [r for r in result["rows"] if r.get("error") and not r["baseline"]]
    for r in failed:
        print(f"FAILED: {_line(r)}", file=sys.stderr)
    return 1 if failed else 0
