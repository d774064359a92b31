"""Tables and plots from benchmark JSON files (never typed by hand).

    python -m fastppo.bench.report bench/results/*.json              # README's tables (summary), to stdout
    python -m fastppo.bench.report FILE.json --full                  # every row
    python -m fastppo.bench.report FILE.json --markdown OUT.md --plot OUT.png

Summary: one line per op, shape, dtype and pass: the fastest fastppo implementation, its time,
achieved rate and fraction of the peak measured in the same run, its speed-up over each baseline,
and its peak memory beside the baselines'. Full: every row, with peak memory and the largest
difference from the reference. Both end with what each baseline is (project, file, version) and
what was not run, and why.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

PEAK_NAMES = {"copy_gbs": "copy", "matmul_bf16_tflops": "bf16 matmul", "matmul_fp32_tflops": "fp32 matmul"}
PEAK_UNITS = {"copy_gbs": "GB/s", "matmul_bf16_tflops": "TFLOP/s", "matmul_fp32_tflops": "TFLOP/s"}
VERSION_ORDER = ("torch", "triton", "transformers", "python", "cuda", "liger-kernel", "cut-cross-entropy", "flash-attn")


def load(path) -> dict:
    with open(path) as f:
        run = json.load(f)
    if not isinstance(run, dict) or "rows" not in run or "peaks" not in run:
        raise ValueError(f"{path}: not a fastppo bench result (no 'rows' and 'peaks')")
    return run


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _achieved(r: dict) -> str:
    return "-" if r.get("achieved") is None else f"{_num(r['achieved'])} {r['unit']}"


def _fraction(r: dict) -> str:
    f = r.get("fraction_of_peak")
    return "-" if f is None else f"{100 * f:.1f}%"


def _speedups(r: dict) -> str:
    s = r.get("speedup") or {}
    return ", ".join(f"{v:.2f}x {k}" for k, v in s.items()) or "-"


def header(run: dict) -> str:
    v = run.get("versions", {})
    vs = ", ".join(f"{k} {v[k]}" for k in VERSION_ORDER if k in v)
    peaks = ", ".join(
        f"{PEAK_NAMES.get(k, k)} {_num(val)} {PEAK_UNITS.get(k, '')}".strip() for k, val in run["peaks"].items()
    )
    mode = " `--quick`;" if run.get("quick") else ""
    compiled = "" if run.get("compile", True) else " torch.compile peers off;"
    return (
        f"### {run['device']}: {run['device_name']}, {run['date']}\n\n"
        f"{vs}; {run.get('threads', '?')} torch threads;{mode}{compiled} peaks measured in the same run: {peaks}.\n"
    )


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["op"], r["shape"], r["dtype"], r["pass"]), []).append(r)
    return out


def _baseline_memory(best: dict, rows: list[dict]) -> str:
    """``145 (trl 1840, verl 1920)``: the row's peak MiB, then each timed baseline's."""
    if best.get("peak_mem_mb") is None:
        return "-"
    others = ", ".join(
        f"{r['impl']} {_num(r['peak_mem_mb'])}" for r in rows if r["baseline"] and r.get("peak_mem_mb") is not None
    )
    return f"{_num(best['peak_mem_mb'])} ({others})" if others else _num(best["peak_mem_mb"])


def summary_table(run: dict) -> str:
    lines = [
        "| op | shape | dtype | pass | fastppo | ms | achieved | of peak | speed-up over the baselines "
        "| peak MiB (baselines') |",
        "|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for (op, shape, dtype, pass_), rows in _groups(run["rows"]).items():
        ours = [r for r in rows if not r["baseline"] and r.get("time_ms")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        lines.append(
            f"| {op} | {shape} | {dtype} | {pass_} | {best['impl']} | {_num(best['time_ms'])} | "
            f"{_achieved(best)} | {_fraction(best)} | {_speedups(best)} | {_baseline_memory(best, rows)} |"
        )
    return "\n".join(lines) + "\n"


def full_table(run: dict) -> str:
    lines = [
        "| op | shape | dtype | pass | impl | ms | achieved | of peak | peak MiB | max abs diff "
        "| speed-up over the baselines |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in run["rows"]:
        if not r.get("time_ms"):
            continue
        diff = "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {r['impl']} | {_num(r['time_ms'])} | "
            f"{_achieved(r)} | {_fraction(r)} | {_num(r.get('peak_mem_mb'))} | {diff} | {_speedups(r)} |"
        )
    return "\n".join(lines) + "\n"


def notes(run: dict) -> str:
    """What each baseline is, per op, and what was not run."""
    sources: dict[str, dict[str, str]] = {}
    missing: dict[str, set[str]] = {}
    for r in run["rows"]:
        if r["baseline"]:
            sources.setdefault(r["op"], {})[r["impl"]] = r["source"]
        why = r.get("skipped") or (f"error: {r['error']}" if r.get("error") else None)
        if why:
            missing.setdefault(why, set()).add(r["impl"])
    out = ["Baselines:"]
    for op, impls in sources.items():
        out.append(f"- `{op}`: " + "; ".join(f"{k}: {v}" for k, v in impls.items()))
    if missing:
        out.append("\nNot run: " + "; ".join(f"{', '.join(sorted(v))} ({k})" for k, v in missing.items()) + ".")
    return "\n".join(out) + "\n"


def markdown(runs: list[dict], *, full: bool = False) -> str:
    parts = []
    for run in sorted(runs, key=lambda r: (r["device"], r["date"])):
        table = full_table(run) if full else summary_table(run)
        parts.append(f"{header(run)}\n{table}\n{notes(run)}")
    return "\n".join(parts)


def plot(run: dict, path) -> bool:
    """A PNG of the run: per group, the fastest fastppo row's speed-up over each baseline (log scale).
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, series = [], {}
    for (op, shape, dtype, pass_), rows in _groups(run["rows"]).items():
        ours = [r for r in rows if not r["baseline"] and r.get("time_ms")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        labels.append(f"{op} {shape} {dtype} {pass_}\n({best['impl']})")
        for name, x in best["speedup"].items():
            series.setdefault(name, {})[len(labels) - 1] = x
    fig, ax = plt.subplots(figsize=(12, 0.45 * max(len(labels), 4) + 1.5))
    width = 0.8 / max(len(series), 1)
    for k, (name, points) in enumerate(sorted(series.items())):
        ys = sorted(points)
        ax.barh([y + k * width for y in ys], [points[y] for y in ys], height=width, label=name)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([y + (len(series) - 1) * width / 2 for y in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of fastppo over the baseline (x, log scale)")
    ax.set_title(f"{run['device']}: {run['device_name']}, {run['date']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastppo.bench.report", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="fastppo bench JSON results")
    p.add_argument("--full", action="store_true", help="every row (default: one summary line per group)")
    p.add_argument("--markdown", metavar="FILE.md", help="write the markdown here instead of stdout")
    p.add_argument("--plot", metavar="FILE.png", help="a PNG of the last file's run (needs matplotlib)")
    a = p.parse_args(argv)
    runs = [load(f) for f in a.files]
    text = markdown(runs, full=a.full)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(text)
    else:
        sys.stdout.write(text)
    if a.plot and not plot(runs[-1], a.plot):
        print(
            f"report: {a.plot} not written: matplotlib is not installed (pip install 'fastppo[bench]')", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
