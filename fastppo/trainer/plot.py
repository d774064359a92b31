"""``fastppo plot DIR``: a PNG of a run's curves from its ``metrics.jsonl`` and ``eval.jsonl``.

Five panels over the step: reward (``reward_mean``, the return with the KL penalty, and ``score_mean``,
the raw score), evaluation reward (``eval_reward_mean``), KL (``kl``), entropy (``entropy``) and
response length (``response_length_mean``). Needs matplotlib (``pip install matplotlib``); it draws
on an Agg canvas of its own, so the caller's pyplot backend and figures are left alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

# (title, [(file, key, label)])
PANELS = [
    ("reward", [("metrics", "reward_mean", "reward (with KL)"), ("metrics", "score_mean", "score")]),
    ("eval reward", [("eval", "eval_reward_mean", "eval reward")]),
    ("KL to the reference", [("metrics", "kl", "kl per token")]),
    ("entropy", [("metrics", "entropy", "entropy per token")]),
    ("response length", [("metrics", "response_length_mean", "tokens")]),
]


def _records(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a killed run
            continue
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """``(steps, values)`` where ``key`` is a number (null, i.e. NaN or inf, is skipped)."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_run(run_dir, output=None) -> pathlib.Path:
    """Draw the curves of the run in ``run_dir`` into ``output`` (default ``run_dir/plot.png``); returns
    its path. Raises FileNotFoundError without ``run_dir/metrics.jsonl``, ImportError without matplotlib."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a fastppo train output_dir?)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("fastppo plot needs matplotlib: pip install matplotlib") from e
    data = {name: _records(run_dir / f"{name}.jsonl") for name in ("metrics", "eval")}
    fig = Figure(figsize=(13, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    for ax in axes[len(PANELS) :]:
        ax.set_axis_off()
    for ax, (title, lines) in zip(axes, PANELS):
        drawn = False
        for name, key, label in lines:
            steps, values = _series(data[name], key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(lines) > 1:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    output = pathlib.Path(output) if output is not None else run_dir / "plot.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return output


def main(argv=None) -> int:
    """``fastppo plot DIR [--output FILE.png]``."""
    parser = argparse.ArgumentParser(prog="fastppo plot", description="Plot a fastppo train run's curves into a PNG.")
    parser.add_argument("run_dir", metavar="DIR", help="the output_dir of a fastppo train run")
    parser.add_argument("--output", "-o", metavar="FILE.png", default=None, help="where to write (DIR/plot.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.output)
    except (FileNotFoundError, ImportError) as e:
        sys.stderr.write(f"fastppo plot: error: {e}\n")
        return 1
    print(f"wrote {path}")
    return 0
