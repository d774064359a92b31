"""The benchmark harness (fastppo.bench) on the CPU: timing, rows, peaks, baselines, report."""

import json
import time

import pytest
import torch

from fastppo.bench import report
from fastppo.bench.cases import BenchConfig
from fastppo.bench.command import output_path
from fastppo.bench.runner import OPS, add_speedups, plan, resolve_ops, run, run_case
from fastppo.bench.timing import QUICK_CPU_TIMER, TimerSettings, measure

ROW_KEYS = {
    "op", "impl", "pass", "shape", "dtype", "device", "source", "baseline", "time_ms", "reps", "peak_mem_mb",
    "work", "achieved", "unit", "peak", "fraction_of_peak", "speedup", "max_abs_diff",
}  # fmt: skip
RUN_KEYS = {"schema", "date", "timestamp", "device", "device_name", "versions", "threads", "quick", "peaks", "rows"}
QUICK = BenchConfig(device="cpu", quick=True, compile=False)
FAST = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)


def test_measure_takes_the_median_of_the_timed_calls():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.004 if len(calls) % 3 else 0.05)  # calls 3 and 6 are slow: the median of 2..6 ignores them

    t = measure(fn, "cpu", TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=5, max_reps=5))
    assert t.reps == 5 and len(calls) == 7  # an untimed warm-up call first, an untimed memory call last
    assert 4.0 <= t.time_ms < 30.0


def test_measure_sees_the_memory_a_call_adds_on_the_cpu():
    def fn():
        return torch.ones(16 << 20)  # 64 MiB, freed when the call returns: a later call reuses nothing

    t = measure(fn, "cpu", TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3))
    if t.peak_mem_mb is None:
        pytest.skip("no /proc/self/clear_refs or glibc mallopt here")
    assert 60 <= t.peak_mem_mb < 200
    small = measure(lambda: torch.ones(16), "cpu", TimerSettings(0.0, 0.0, 3, 3))
    assert small.peak_mem_mb < 8


@pytest.fixture(scope="module")
def whiten_run():
    torch.set_num_threads(1)
    return run(["whiten"], QUICK, QUICK_CPU_TIMER)


def test_run_rows_have_the_schema(whiten_run):
    assert whiten_run.keys() >= RUN_KEYS
    assert {"copy_gbs", "matmul_bf16_tflops", "matmul_fp32_tflops"} <= whiten_run["peaks"].keys()
    assert {"torch", "transformers", "fastppo", "python"} <= whiten_run["versions"].keys()
    rows = whiten_run["rows"]
    assert {r["impl"] for r in rows} >= {"fastppo-torch", "trl", "openrlhf", "verl", "torch.compile(ref)"}
    for r in rows:
        assert r.keys() >= ROW_KEYS, ROW_KEYS - r.keys()
        assert r["pass"] in ("fwd", "fwd+bwd") and r["device"] == "cpu"
        if r["impl"] == "torch.compile(ref)":
            assert r["time_ms"] is None and "compile" in r["skipped"]
        else:
            assert r["time_ms"] > 0 and r["unit"] == "GB/s" and r["peak"] == "copy_gbs", r
    json.dumps(whiten_run)  # serializable as it is


def test_fraction_of_peak_is_against_the_same_runs_peak(whiten_run):
    timed = [r for r in whiten_run["rows"] if r["time_ms"]]
    assert timed
    for r in timed:
        assert r["achieved"] == pytest.approx(r["work"] / (r["time_ms"] * 1e-3) / 1e9)
        assert r["fraction_of_peak"] == pytest.approx(r["achieved"] / whiten_run["peaks"][r["peak"]])


def test_speedups_are_over_each_baseline_of_the_group(whiten_run):
    rows = {r["impl"]: r for r in whiten_run["rows"] if r["time_ms"]}
    ours = rows["fastppo-torch"]
    assert set(ours["speedup"]) == {"trl", "openrlhf", "verl"}
    for name, x in ours["speedup"].items():
        assert x == pytest.approx(rows[name]["time_ms"] / ours["time_ms"])
    assert "trl" not in rows["trl"]["speedup"]  # never over itself


def test_add_speedups_keeps_groups_apart():
    def row(impl, ms, baseline, shape="a"):
        return dict(op="x", shape=shape, dtype="f", pass_="fwd", device="cpu", impl=impl, time_ms=ms, baseline=baseline)

    rows = [row("ours", 2.0, False), row("trl", 6.0, True), row("trl", 1.0, True, shape="b")]
    for r in rows:
        r["pass"] = r.pop("pass_")
    add_speedups(rows)
    assert rows[0]["speedup"] == {"trl": 3.0}
    assert rows[2]["speedup"] == {}


@pytest.mark.parametrize("op", [op for op in OPS if op not in ("generate", "ppo_step")])  # no transcribed baselines
def test_baselines_compute_what_fastppo_computes(op):
    """Every transcribed baseline agrees with fastppo's reference on the same inputs (on valid
    positions; OpenRLHF whitens with the biased variance, hence its looser bound)."""
    torch.set_num_threads(1)
    rows = []
    for case in plan([op], QUICK)[0][1]:
        rows += run_case(case, FAST, {"copy_gbs": 1.0, "matmul_fp32_tflops": 1.0, "matmul_bf16_tflops": 1.0})
        case.release()
    checked = [r for r in rows if r["baseline"] and r["max_abs_diff"] is not None]
    assert {r["impl"] for r in checked} >= {"trl", "openrlhf", "verl"}, rows
    for r in rows:
        assert not r.get("error"), r
    for r in checked:
        tol = 2e-3 if (op, r["impl"]) == ("whiten", "openrlhf") else 1e-4
        assert r["max_abs_diff"] < tol, r


def test_resolve_ops_aliases_and_errors():
    assert resolve_ops(["losses"]) == ["policy_loss", "value_loss", "kl"]
    assert resolve_ops(["gae", "advantages"]) == ["gae", "whiten"]
    assert resolve_ops(["linear-logprobs"]) == ["linear_logprobs"]
    assert resolve_ops([]) == list(OPS)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        resolve_ops(["nope"])


def test_output_path_names_by_device_and_date(tmp_path):
    cpu = {"device": "cpu", "device_name": "x", "date": "2026-12-01"}
    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "date": "2026-12-02"}
    assert output_path(f"{tmp_path}/", cpu) == tmp_path / "cpu-2026-12-01.json"
    assert output_path(str(tmp_path), gpu) == tmp_path / "nvidia-h200-2026-12-02.json"
    assert output_path(f"{tmp_path}/{{device}}-{{date}}-logits.json", gpu).name == "nvidia-h200-2026-12-02-logits.json"


def _toy_run():
    base = dict(shape="B=1 T=2", dtype="float32", pass_="fwd", device="cpu", reps=3, peak_mem_mb=1.0, work=8.0)
    rows = [
        dict(base, op="gae", impl="fastppo-torch", baseline=False, time_ms=2.0, achieved=4.0, unit="GB/s",
             peak="copy_gbs", fraction_of_peak=0.4, speedup={"trl": 2.5}, max_abs_diff=0.0, source="fastppo"),
        dict(base, op="gae", impl="trl", baseline=True, time_ms=5.0, achieved=1.6, unit="GB/s", peak="copy_gbs",
             fraction_of_peak=0.16, speedup={}, max_abs_diff=1e-6, source="TRL 1.12.0 trl/x.py: gae"),
        dict(base, op="gae", impl="fastppo-triton", baseline=False, time_ms=None, achieved=None, unit=None,
             peak=None, fraction_of_peak=None, speedup={}, max_abs_diff=None, source="k", skipped="CUDA only"),
    ]  # fmt: skip
    for r in rows:
        r["pass"] = r.pop("pass_")
    return {
        "schema": 1, "date": "2026-12-01", "timestamp": "t", "device": "cpu", "device_name": "Test CPU (2 cores)",
        "versions": {"torch": "2.13.0", "python": "3.11"}, "threads": 1, "quick": True, "compile": False,
        "peaks": {"copy_gbs": 10.0}, "rows": rows,
    }  # fmt: skip


def test_report_summary_table():
    text = report.markdown([_toy_run()])
    assert "### cpu: Test CPU (2 cores), 2026-12-01" in text
    assert "copy 10 GB/s" in text
    assert "| gae | B=1 T=2 | float32 | fwd | fastppo-torch | 2 | 4 GB/s | 40.0% | 2.50x trl | 1 (trl 1) |" in text
    assert "trl: TRL 1.12.0 trl/x.py: gae" in text
    assert "Not run: fastppo-triton (CUDA only)." in text


def test_report_command_reproduces_the_table_from_a_json_file(tmp_path, capsys, whiten_run):
    path = tmp_path / "cpu-2026-12-01.json"
    path.write_text(json.dumps(whiten_run))
    assert report.main([str(path)]) == 0
    assert capsys.readouterr().out == report.markdown([whiten_run])
    out = tmp_path / "full.md"
    assert report.main([str(path), "--full", "--markdown", str(out)]) == 0
    full = out.read_text()
    assert full == report.markdown([whiten_run], full=True)
    timed = [r for r in whiten_run["rows"] if r["time_ms"]]
    assert full.count("\n| whiten |") == len(timed)


def test_report_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fastppo bench result"):
        report.load(path)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    assert report.plot(_toy_run(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
