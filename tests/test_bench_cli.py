"""`fastppo bench` end to end (subprocesses), the bench/ entry points under plain pytest, and the
GPU check's dry run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_OPS = {"logprobs", "linear_logprobs", "policy_loss", "value_loss", "kl", "gae", "whiten", "generate"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = ""
    return env


def _fastppo(*args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fastppo.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def _check_run(run: dict, ops: set) -> None:
    assert run["device"] == "cpu" and run["quick"] is True
    assert {r["op"] for r in run["rows"]} >= ops
    for r in run["rows"]:
        assert not (r.get("error") and not r["baseline"]), r
    timed = [r for r in run["rows"] if r["time_ms"]]
    assert {r["op"] for r in timed} >= ops
    assert any(r["impl"].startswith("fastppo") for r in timed)


def test_bench_quick_outside_the_checkout(tmp_path):
    """From a folder that is not the source checkout: the harness is in the package, bench/ is not needed."""
    out = _fastppo(
        "bench", "gae", "whiten", "--quick", "--output", f"{tmp_path}/", "--markdown", "run.md", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("cpu-*.json")
    run = json.loads(path.read_text())
    _check_run(run, {"gae", "whiten"})
    assert path.name == f"cpu-{run['date']}.json"
    assert "| whiten |" in (tmp_path / "run.md").read_text()
    assert "| gae |" in out.stdout  # the summary table


def test_bench_unknown_name_is_a_clear_error(tmp_path):
    out = _fastppo("bench", "nosuch", cwd=tmp_path)
    assert out.returncode != 0
    assert "unknown benchmark 'nosuch'" in out.stderr and "losses" in out.stderr


def test_bench_old_names_still_work(tmp_path):
    """The former `fastppo bench NAME` scripts' names are ops or aliases."""
    out = _fastppo("bench", "losses", "logprobs", "linear_logprobs", "generate", "gae", "--list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ops = {line.split()[0] for line in out.stdout.splitlines()}
    assert ops == {"policy_loss", "value_loss", "kl", "logprobs", "linear_logprobs", "generate", "prefill", "gae"}


@pytest.mark.slow
def test_bench_quick_runs_every_op(tmp_path):
    """`fastppo bench --quick --output FILE.json`: what CI runs as a smoke test (about a minute on 2 cores)."""
    out = _fastppo("bench", "--quick", "--output", str(tmp_path / "run.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads((tmp_path / "run.json").read_text())
    _check_run(run, ALL_OPS | {"prefill", "decode_step"})


def test_bench_files_collect_and_run_under_plain_pytest():
    """bench/*.py import under plain pytest (without the plugin, too) and their benchmarks run once."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run([*cmd, "--collect-only", "bench/"], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for name in ("gae", "losses", "logprobs", "linear_logprobs", "generate"):
        assert f"bench/bench_{name}.py::test_bench[" in out.stdout, name
    out = subprocess.run(
        [*cmd, "-p", "no:benchmark", "bench/bench_gae.py"], cwd=ROOT, capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


@pytest.mark.slow
def test_every_bench_file_runs_under_pytest():
    """`python -m pytest bench/ -q`: each benchmark once, quick shapes."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def _gpu_check(*args):
    env = dict(_env(), PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_gpu_check_dry_run_prints_a_plan_that_fits():
    out = _gpu_check("--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and "s  " in line]
    assert steps == ["install", "wheels", "env", "tests", "logprobs", "linear", "generate", "report"]
    total = int(next(line for line in out.stdout.splitlines() if "total" in line).split()[1].rstrip("s"))
    assert total <= 480
    assert "FASTPPO_TEST_CUDA=1" in out.stdout and "--timeout" not in out.stdout  # no pytest-timeout assumed
    assert "--no-deps --no-build-isolation -e ." in out.stdout
    assert "FAIL" not in out.stdout


def test_gpu_check_rejects_unknown_steps():
    out = _gpu_check("--dry-run", "install", "nosuch")
    assert out.returncode == 2
    assert "unknown step 'nosuch'" in out.stderr
