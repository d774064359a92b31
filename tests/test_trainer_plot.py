"""``fastppo plot DIR``: a PNG of a run's curves; clear errors without matplotlib or a run folder."""

import json
import sys

import pytest

from fastppo.cli import main as fastppo_main


def _run_folder(path):
    path.mkdir()
    metrics = [
        {"step": s, "reward_mean": 0.1 * s, "score_mean": 0.2 * s, "kl": 0.01 * s, "entropy": 3 - 0.1 * s,
         "response_length_mean": 5 + s, "explained_variance": None}
        for s in range(1, 6)
    ]  # fmt: skip
    lines = [json.dumps(m) for m in metrics] + ['{"step": 6, "rew']  # a line cut off by a killed run
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "eval.jsonl").write_text("\n".join(json.dumps({"step": s, "eval_reward_mean": 0.3 * s}) for s in (0, 5)))
    return path


def test_plot_writes_a_png_from_the_run_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run_folder(tmp_path / "run")
    assert fastppo_main(["plot", str(run)]) == 0
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {run / 'plot.png'}" in capsys.readouterr().out
    assert fastppo_main(["plot", str(run), "--output", str(tmp_path / "figs" / "curves.png")]) == 0
    assert (tmp_path / "figs" / "curves.png").stat().st_size > 10_000


def test_plot_without_matplotlib_or_a_run_says_what_to_do(tmp_path, monkeypatch, capsys):
    run = _run_folder(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert fastppo_main(["plot", str(run)]) == 1
    assert "fastppo plot: error: fastppo plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not (run / "plot.png").exists()
    assert fastppo_main(["plot", str(tmp_path / "nothing")]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err
