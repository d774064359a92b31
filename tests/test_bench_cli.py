"""`fastppo bench` end to end (subprocesses), the bench/ entry points under plain pytest, and the
GPU check's dry run."""

import json
import os
import pathlib
import re
import shutil
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """fastppo's wheel, built from a copy of the package (an in-tree build would write build/ and
    *.egg-info into the shared checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for package in ("fastppo", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    (path,) = tmp.glob("fastppo-*.whl")
    return path


@pytest.mark.slow
def test_bench_quick_from_a_wheel_install(wheel, tmp_path):
    """`fastppo bench --quick` from the wheel installed into a folder of its own, run from a folder that
    is not the checkout, with only that folder on PYTHONPATH: the checkout's editable install is not
    what runs."""
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True)
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = dict(_env(), PYTHONPATH=str(site))
    code = "import fastppo, fastppo.kernels, fastppo.bench; print(fastppo.__file__); print(fastppo.kernels.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    for line in where.stdout.split():
        assert pathlib.Path(line).resolve().is_relative_to(site.resolve()), where.stdout
    out = subprocess.run(
        [sys.executable, "-m", "fastppo", "bench", "gae", "--quick", "--output", "X.json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads((cwd / "X.json").read_text())
    _check_run(run, {"gae"})
    assert run["versions"]["fastppo"]
    assert "| gae |" in out.stdout


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


def _plan(stdout: str) -> dict[str, tuple[int, str]]:
    """The dry run's ``  name  limits  command`` lines -> {name: (limit, command)}, in order."""
    plan = {}
    for line in stdout.splitlines():
        m = re.match(r"  (\S+) +(\d+)s  (.*)", line)
        if m:
            plan[m[1]] = (int(m[2]), m[3])
    return plan


def test_gpu_check_dry_run_prints_a_plan_that_fits():
    out = _gpu_check("--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    plan = _plan(out.stdout)
    steps = ["install", "wheels", "env", "tests", "logprobs", "linear", "generate", "e2e", "profile", "nccl", "report"]
    assert list(plan) == steps
    total = int(next(line for line in out.stdout.splitlines() if "total" in line).split()[1].rstrip("s"))
    assert total == sum(limit for limit, _ in plan.values()) <= 480
    assert "FASTPPO_TEST_CUDA=1" in out.stdout and "--timeout" not in out.stdout  # no pytest-timeout assumed
    assert "--no-deps --no-build-isolation -e ." in out.stdout
    assert "fastppo.bench --device cuda ppo_step --output " in plan["e2e"][1]
    assert plan["e2e"][1].endswith("/ppo_step.json")
    assert re.search(r"-m fastppo profile --output-dir \S+/profile --max-steps 3$", plan["profile"][1])
    assert plan["nccl"][1] == "nccl_smoke"  # a function of the script: torchrun -m fastppo train on CUDA
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    body = script[script.index("nccl_smoke() {") : script.index("\n}\n", script.index("nccl_smoke() {"))]
    assert "-m torch.distributed.run --standalone --nproc-per-node 1 -m fastppo train" in body
    assert "--backend nccl" in body and "--device cuda" in body and '"$out/nccl"' in body
    assert "FAIL" not in out.stdout


def test_gpu_check_extra_steps_are_outside_the_default_plan():
    out = _gpu_check("--dry-run", "losses", "tune")
    assert out.returncode == 0, out.stdout + out.stderr
    plan = _plan(out.stdout)
    assert list(plan) == ["losses", "tune"]


def test_readme_documents_the_device_call_of_the_gpu_check():
    """README's device call is the one gpu_check.sh's header gives, and its timeout leaves room above
    the plan's limits; the former four-stage gpu_session.sh is gone."""
    header = (ROOT / "bench" / "gpu_check.sh").read_text()
    call = re.search(r'command "bash bench/gpu_check.sh", carry \["\.whl"\], timeout_s (\d+)', header)
    assert call, "gpu_check.sh's header no longer states the device call"
    readme = (ROOT / "README.md").read_text()
    assert f'command `bash bench/gpu_check.sh`, carry `[".whl"]`, timeout_s `{call[1]}`' in readme
    assert "bash bench/fetch_wheels.sh" in readme
    max_total = int(re.search(r"^MAX_TOTAL=(\d+)$", header, re.M)[1])
    assert int(call[1]) >= max_total + 30
    assert not (ROOT / "bench" / "gpu_session.sh").exists() and "gpu_session" not in readme


def test_gpu_check_rejects_unknown_steps():
    out = _gpu_check("--dry-run", "install", "nosuch")
    assert out.returncode == 2
    assert "unknown step 'nosuch'" in out.stderr
