"""Tables and plots from benchmark JSON files (never typed by hand).

    python -m fastppo.bench.report bench/results/*.json              # README's tables (summary), to stdout
    python -m fastppo.bench.report FILE.json --full                  # every row
    python -m fastppo.bench.report FILE.json --markdown OUT.md --plot OUT.png
    python -m fastppo.bench.report --readme README.md bench/results/*.json  # regenerate README's tables
    python -m fastppo.bench.report --readme README.md --check bench/results/*.json  # exit 1 if stale

Summary: one line per op, shape, dtype and pass: the fastest fastppo implementation, its time,
achieved rate and fraction of the peak measured in the same run, its speed-up over each baseline,
and its peak memory beside the baselines'. Full: every row, with peak memory and the largest
difference from the reference. Both end with what each baseline is (project, file, version) and
what was not run, and why.

README (``--readme``): the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is
replaced by one section per device (kind and name), built from the newest run of each op on that
device (a full-shape run before a ``--quick`` one): per run, its file, date, versions and peaks, then
one line per op, shape, dtype and pass with the fastest fastppo implementation's time, each timed
baseline's time and fastppo's speed-up over it (the row's ``speedup``, so a ``tok/s`` op compares
throughputs), and peak memory beside the baselines'; rows not run are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

PEAK_NAMES = {"copy_gbs": "copy", "matmul_bf16_tflops": "bf16 matmul", "matmul_fp32_tflops": "fp32 matmul"}
PEAK_UNITS = {"copy_gbs": "GB/s", "matmul_bf16_tflops": "TFLOP/s", "matmul_fp32_tflops": "TFLOP/s"}
VERSION_ORDER = (
    "torch", "triton", "transformers", "python", "cuda", "trl", "liger-kernel", "cut-cross-entropy", "flash-attn",
)  # fmt: skip
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
README_COMMAND = "python -m fastppo.bench.report --readme README.md bench/results/*.json"


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


def _conditions(run: dict) -> str:
    """``torch 2.13.0, ...; 1 torch thread; peaks measured in the same run: copy 11.5 GB/s, ...``"""
    v = run.get("versions", {})
    vs = ", ".join(f"{k} {v[k]}" for k in VERSION_ORDER if k in v)
    peaks = ", ".join(
        f"{PEAK_NAMES.get(k, k)} {_num(val)} {PEAK_UNITS.get(k, '')}".strip() for k, val in run["peaks"].items()
    )
    mode = " `--quick`;" if run.get("quick") else ""
    compiled = "" if run.get("compile", True) else " torch.compile peers off;"
    threads = run.get("threads", "?")
    return (
        f"{vs}; {threads} torch thread{'' if threads == 1 else 's'};{mode}{compiled} "
        f"peaks measured in the same run: {peaks or '-'}"
    )


def header(run: dict) -> str:
    return f"### {run['device']}: {run['device_name']}, {run['date']}\n\n{_conditions(run)}.\n"


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


def _timed(r: dict) -> bool:
    return bool(r.get("time_ms")) or r.get("achieved") is not None


def _fastest(rows: list[dict]) -> dict | None:
    """The best timed fastppo row: the highest rate for a ``tok/s`` op (what a step does may differ
    between implementations), else the shortest time."""
    ours = [r for r in rows if not r["baseline"] and _timed(r)]
    if not ours:
        return None
    if all(r.get("unit") == "tok/s" and r.get("achieved") is not None for r in ours):
        return max(ours, key=lambda r: r["achieved"])
    return min((r for r in ours if r.get("time_ms")), key=lambda r: r["time_ms"], default=ours[0])


def _figure(r: dict) -> str:
    """``1.59 ms``, or with a throughput unit ``445 ms, 144 tok/s``."""
    ms = f"{_num(r['time_ms'])} ms" if r.get("time_ms") else None
    rate = f"{_num(r['achieved'])} {r['unit']}" if r.get("unit") == "tok/s" and r.get("achieved") is not None else None
    return ", ".join(x for x in (ms, rate) if x) or "-"


def _not_run(r: dict) -> str | None:
    if r.get("error"):
        return f"error: {r['error']}"
    if r.get("skipped"):
        return str(r["skipped"])
    return None if _timed(r) else "no figures"


def compact_table(run: dict, ops=None) -> str:
    """README's table of one run (only ``ops``, if given): per op, shape, dtype and pass, the fastest
    fastppo implementation, each timed baseline with fastppo's speed-up over it, and peak memory;
    then what was not run, and why, and what each baseline is."""
    lines = [
        "| op | shape | dtype | pass | fastppo | baselines (fastppo's speed-up) | peak MiB: fastppo (baselines) |",
        "|---|---|---|---|---|---|---|",
    ]
    missing: dict[str, list[str]] = {}
    sources: dict[str, dict[str, str]] = {}
    for (op, shape, dtype, pass_), rows in _groups(run["rows"]).items():
        if ops is not None and op not in ops:
            continue
        for r in rows:
            why = _not_run(r)
            if why is not None:
                label = f"{r['impl']} in {op}" if r.get("error") else r["impl"]  # an error is news
                if label not in missing.setdefault(why, []):
                    missing[why].append(label)
            elif r["baseline"]:
                sources.setdefault(op, {})[r["impl"]] = r.get("source", "")
        timed = [r for r in rows if _timed(r)]
        if not timed:
            continue
        best = _fastest(rows)
        speedup = (best or {}).get("speedup") or {}
        cells = []
        for b in (r for r in timed if r["baseline"]):
            x = speedup.get(b["impl"])
            cells.append(f"{b['impl']} {_figure(b)}" + (f" ({x:.2f}x)" if x is not None else ""))
        ours = f"{best['impl']} {_figure(best)}" if best else "not run"
        memory = _baseline_memory(best, rows) if best else "-"
        lines.append(f"| {op} | {shape} | {dtype} | {pass_} | {ours} | {', '.join(cells) or '-'} | {memory} |")
    out = "\n".join(lines) + "\n"
    if missing:
        out += "\nNot run: " + "; ".join(f"{', '.join(sorted(v))} ({k})" for k, v in missing.items()) + ".\n"
    if sources:
        out += "\n<details><summary>Baselines: project, file, version</summary>\n\n"
        out += "\n".join(
            f"- `{op}`: " + "; ".join(f"{k}: {v}" for k, v in impls.items()) for op, impls in sources.items()
        )
        out += "\n\n</details>\n"
    return out


def _device_key(run: dict) -> tuple[str, str]:
    return run["device"], run["device_name"]


def _run_order(run: dict, label: str) -> tuple:
    """Later is preferred: a full-shape run over a ``--quick`` one, then the newest, then the file name."""
    return (not run.get("quick"), run.get("timestamp") or run["date"], run["date"], label)


def newest_runs(runs: dict[str, dict]) -> list[tuple[tuple[str, str], list[tuple[str, dict, list[str]]]]]:
    """``{label: run}`` -> per device, ``[(label, run, the ops it is the newest run of)]``: for every
    (device, op), the preferred run holding a row of that op. Devices: CUDA first, then by name."""
    best: dict[tuple, dict[str, str]] = {}
    for label, run in runs.items():
        for op in dict.fromkeys(r["op"] for r in run["rows"]):
            chosen = best.setdefault(_device_key(run), {})
            if op not in chosen or _run_order(run, label) > _run_order(runs[chosen[op]], chosen[op]):
                chosen[op] = label
    out = []
    for device in sorted(best, key=lambda d: (d[0] != "cuda", d)):
        per_run: dict[str, list[str]] = {}
        for op, label in best[device].items():
            per_run.setdefault(label, []).append(op)
        ordered = sorted(per_run, key=lambda label: _run_order(runs[label], label))
        out.append((device, [(label, runs[label], per_run[label]) for label in ordered]))
    return out


def readme_block(runs: dict[str, dict]) -> str:
    """The generated part of README's performance section, markers included, from ``{file label: run}``."""
    parts = [
        README_BEGIN,
        f"<!-- generated from bench/results/*.json by `{README_COMMAND}`: do not edit by hand -->",
        "",
    ]
    for (device, name), chosen in newest_runs(runs):
        parts.append(f"### {device}: {name}\n")
        for label, run, ops in chosen:
            parts.append(f"`{label}`, {run['date']}: {_conditions(run)}.\n")
            parts.append(compact_table(run, set(ops)))
    if len(parts) == 3:
        parts.append("No benchmark results yet.\n")
    return "\n".join(parts) + README_END


def _labels(files, readme: pathlib.Path) -> dict[str, dict]:
    """``{path relative to the README's folder, as posix: run}``, whatever order the files came in."""
    out = {}
    for f in files:
        label = pathlib.Path(os.path.relpath(os.path.abspath(f), os.path.abspath(readme.parent))).as_posix()
        out[label] = load(f)
    return dict(sorted(out.items()))


def readme_span(text: str) -> tuple[int, int]:
    """Start and end offsets of the generated block (markers included) in README's text."""
    begin = text.find(README_BEGIN)
    end = text.find(README_END, begin + 1)
    if begin < 0 or end < 0 or text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"README: needs exactly one {README_BEGIN} ... {README_END} pair")
    return begin, end + len(README_END)


def update_readme(readme, files, *, check: bool = False) -> bool:
    """Regenerate README's block from ``files``; True if the text changed (with ``check``: would change,
    and nothing is written)."""
    readme = pathlib.Path(readme)
    text = readme.read_text()
    begin, end = readme_span(text)
    new = text[:begin] + readme_block(_labels(files, readme)) + text[end:]
    if new != text and not check:
        readme.write_text(new)
    return new != text


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
    p.add_argument(
        "--readme",
        metavar="README.md",
        help=f"regenerate the tables between {README_BEGIN} and {README_END} in this file from the files",
    )
    p.add_argument("--check", action="store_true", help="with --readme: write nothing, exit 1 if it is out of date")
    a = p.parse_args(argv)
    if a.check and not a.readme:
        p.error("--check needs --readme")
    if a.readme:
        changed = update_readme(a.readme, a.files, check=a.check)
        if a.check and changed:
            print(f"report: {a.readme}'s benchmark tables are out of date; run: {README_COMMAND}", file=sys.stderr)
            return 1
        print(f"report: {a.readme} {'updated' if changed else 'up to date'}", file=sys.stderr)
        return 0
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
