"""README's performance tables are generated from bench/results/*.json (fastppo.bench.report --readme):
the committed block is what the command makes of the committed files, and the generator's rules."""

import json
import pathlib
import re

import pytest

from fastppo.bench import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _committed_runs() -> dict:
    return report._labels(sorted((ROOT / "bench" / "results").glob("*.json")), README)


def test_readme_tables_are_what_the_command_makes_of_the_committed_json():
    text = README.read_text()
    begin, end = report.readme_span(text)
    expected = report.readme_block(_committed_runs())
    assert text[begin:end] == expected, (
        "README.md's benchmark tables differ from bench/results/*.json (edited by hand, or a result file "
        f"added without regenerating them); run from the repository root: {report.README_COMMAND}"
    )


def test_readme_prose_quotes_only_generated_figures():
    """Around the block, the performance section is hand-written: any figure it states (a time, a
    speed-up, a memory or a rate) must be one the generated block shows."""
    text = README.read_text()
    section = text[text.index("\n## Performance") :]
    following = section.find("\n## ", 1)
    section = section if following < 0 else section[:following]
    begin, end = report.readme_span(section)
    prose = section[:begin] + section[end:]
    figure = re.compile(r"\d[\d.,–-]*\s*(?:ms|x|MiB|GB/s|TFLOP/s|tok/s)(?![\w/])")
    stray = [m.group(0) for m in figure.finditer(prose) if m.group(0) not in section[begin:end]]
    assert not stray, f"README's performance prose states figures that are not in the generated tables: {stray}"


# --- the generator, on made-up runs ---


def _row(op, impl, *, baseline, ms=None, unit="GB/s", achieved=None, speedup=None, mem=None, **extra):
    row = {
        "op": op, "impl": impl, "pass": "fwd", "shape": "B=2 T=8", "dtype": "float32", "device": "cpu",
        "source": f"{impl} source", "baseline": baseline, "time_ms": ms, "reps": 3 if ms else None,
        "peak_mem_mb": mem, "work": None, "achieved": achieved, "unit": unit if ms else None, "peak": None,
        "fraction_of_peak": None, "speedup": speedup or {}, "max_abs_diff": None,
    }  # fmt: skip
    row.update(extra)
    return row


def _run(rows, *, date="2026-12-01", device="cpu", name="Test CPU (2 cores)", quick=False, **versions):
    return {
        "schema": 1, "date": date, "timestamp": f"{date}T10:00:00+00:00", "device": device, "device_name": name,
        "versions": {"torch": "2.13.0", "python": "3.11", **versions}, "threads": 1, "quick": quick,
        "compile": True, "peaks": {"copy_gbs": 10.0}, "rows": rows,
    }  # fmt: skip


def _gae_run(ms=2.0, **kw):
    return _run(
        [
            _row("gae", "fastppo-torch", baseline=False, ms=ms, speedup={"verl": 8.0 / ms}, mem=1.0),
            _row("gae", "fastppo-triton", baseline=False, skipped="CUDA only"),
            _row("gae", "verl", baseline=True, ms=8.0, mem=3.0),
            _row("whiten", "fastppo-torch", baseline=False, ms=1.0, speedup={"trl": 1.5}),
            _row("whiten", "trl", baseline=True, ms=1.5),
        ],
        **kw,
    )


def _ppo_step_run():
    """What `fastppo bench ppo_step` writes: one op, a tok/s unit, a failed and a skipped row; the
    speed-up comes from the row (throughputs), not from the times."""
    return _run(
        [
            _row("ppo_step", "fastppo", baseline=False, ms=900.0, unit="tok/s", achieved=455.0,
                 speedup={"trl": 2.5}, mem=700.0),
            _row("ppo_step", "fastppo-graphs", baseline=False, error="RuntimeError: CUDA only path"),
            _row("ppo_step", "trl", baseline=True, ms=1200.0, unit="tok/s", achieved=182.0, mem=1500.0),
            _row("ppo_step", "openrlhf", baseline=True, skipped="openrlhf is not installed"),
        ],
        trl="1.12.0",
    )  # fmt: skip


def test_compact_table_lines():
    text = report.compact_table(_gae_run())
    assert "| op | shape | dtype | pass | fastppo | baselines (fastppo's speed-up) |" in text
    assert "| gae | B=2 T=8 | float32 | fwd | fastppo-torch 2 ms | verl 8 ms (4.00x) | 1 (verl 3) |" in text
    assert "| whiten | B=2 T=8 | float32 | fwd | fastppo-torch 1 ms | trl 1.5 ms (1.50x) | - |" in text
    assert "Not run: fastppo-triton (CUDA only)." in text
    assert "- `gae`: verl: verl source" in text


def test_a_tok_s_op_with_errors_and_skipped_rows():
    text = report.compact_table(_ppo_step_run())
    line = next(s for s in text.splitlines() if s.startswith("| ppo_step"))
    assert line == (
        "| ppo_step | B=2 T=8 | float32 | fwd | fastppo 900 ms, 455 tok/s | trl 1200 ms, 182 tok/s (2.50x) "
        "| 700 (trl 1500) |"
    )
    assert "fastppo-graphs in ppo_step (error: RuntimeError: CUDA only path)" in text
    assert "openrlhf (openrlhf is not installed)" in text


def test_a_group_where_fastppo_failed_still_shows_the_baselines():
    run = _run(
        [
            _row("kl", "fastppo-torch", baseline=False, error="ValueError: boom"),
            _row("kl", "trl", baseline=True, ms=3.0),
            _row("kl", "verl", baseline=True, skipped="not installed"),
        ]
    )
    text = report.compact_table(run)
    assert "| kl | B=2 T=8 | float32 | fwd | not run | trl 3 ms | - |" in text
    assert "fastppo-torch in kl (error: ValueError: boom)" in text
    assert report.compact_table(_run([_row("kl", "x", baseline=False, skipped="CUDA only")])).count("\n| kl") == 0


def test_newest_run_per_device_and_op():
    runs = {
        "r/cpu-2026-11-30.json": _gae_run(ms=4.0, date="2026-11-30"),
        "r/cpu-2026-12-01.json": _run([_row("gae", "fastppo-torch", baseline=False, ms=2.0)], date="2026-12-01"),
        "r/cpu-2026-12-02.json": _gae_run(ms=1.0, date="2026-12-02", quick=True),  # a smoke run: never preferred
        "r/cpu-ppo-step-2026-12-01.json": _ppo_step_run(),
        "r/nvidia-h200-2026-12-01.json": _gae_run(ms=0.1, device="cuda", name="NVIDIA H200", cuda="12.8"),
    }
    chosen = report.newest_runs(runs)
    assert [device for device, _ in chosen] == [("cuda", "NVIDIA H200"), ("cpu", "Test CPU (2 cores)")]
    cpu = {label: ops for label, _, ops in chosen[1][1]}
    assert cpu == {
        "r/cpu-2026-11-30.json": ["whiten"],  # no newer full run has whiten
        "r/cpu-2026-12-01.json": ["gae"],
        "r/cpu-ppo-step-2026-12-01.json": ["ppo_step"],
    }
    block = report.readme_block(runs)
    assert block.startswith(report.README_BEGIN) and block.endswith(report.README_END)
    assert block.index("### cuda: NVIDIA H200") < block.index("### cpu: Test CPU (2 cores)")
    assert (
        "`r/cpu-ppo-step-2026-12-01.json`, 2026-12-01: torch 2.13.0, python 3.11, trl 1.12.0; 1 torch thread;" in block
    )
    assert "fastppo-torch 4 ms" not in block and "fastppo-torch 1 ms | verl" not in block
    assert block.count("| gae |") == 2  # CUDA's and the CPU's newest full run
    assert report.readme_block(dict(reversed(runs.items()))) == block  # whatever order the files come in


def test_no_results_yet():
    assert "No benchmark results yet." in report.readme_block({})


def test_update_readme_rewrites_only_the_block(tmp_path, capsys):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "cpu-2026-12-01.json").write_text(json.dumps(_gae_run()))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Performance\n\nHand-written.\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nEnd.\n"
    )
    files = [str(results / "cpu-2026-12-01.json")]
    assert report.main(["--readme", str(readme), "--check", *files]) == 1
    assert report.README_COMMAND in capsys.readouterr().err
    assert report.main(["--readme", str(readme), *files]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\nHand-written.\n\n<!-- bench:begin -->") and text.endswith(
        "\n\nEnd.\n"
    )
    assert "`bench/results/cpu-2026-12-01.json`, 2026-12-01" in text and "| gae |" in text and "old" not in text
    assert report.main(["--readme", str(readme), "--check", *files]) == 0
    assert not report.update_readme(readme, files)


def test_update_readme_needs_one_pair_of_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:begin"):
        report.update_readme(readme, [])
