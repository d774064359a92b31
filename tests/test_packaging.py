"""Packaging guards: `kernels/` is `fastppo.kernels`, never a top-level `kernels` that transformers would find."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage():
    import fastppo.kernels

    assert pathlib.Path(fastppo.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_no_top_level_kernels_installed():
    """Outside the repository root, `kernels` must never resolve to our folder: the install maps it to
    `fastppo.kernels` only (the HF hub ships a top-level `kernels` package that transformers probes for)."""
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else 'NONE')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, check=True)
    assert not out.stdout.strip().startswith(str(ROOT)), f"top-level `kernels` resolves to our folder: {out.stdout}"


@pytest.mark.parametrize("cwd", ["root", "tests"])
def test_transformers_probe_is_harmless(cwd):
    """transformers probes `kernels` with find_spec and, lacking package metadata, imports it. From the
    repository root (cwd on sys.path) that finds our folder: it must be harmless there: nothing
    imported beyond the docstring-only __init__, and transformers must not think HF kernels exist."""
    code = (
        "import sys, transformers, transformers.modeling_utils;"
        "from transformers.utils.import_utils import is_kernels_available;"
        "m = sys.modules.get('kernels');"
        "print(getattr(m, '__file__', 'NONE') if m else 'NONE');"
        "print(sorted(k for k in sys.modules if k.startswith('kernels.')));"
        "print(is_kernels_available())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT if cwd == "root" else ROOT / "tests",
        capture_output=True,
        text=True,
        check=True,
    )
    origin, submodules, available = out.stdout.strip().splitlines()
    assert submodules == "[]", out.stdout
    assert available == "False", out.stdout
    if cwd == "tests":
        assert not origin.startswith(str(ROOT)), out.stdout


def test_nothing_imports_top_level_kernels():
    """No source file may `import kernels` / `from kernels import ...` (only `fastppo.kernels`)."""
    offenders = []
    for path in [
        *ROOT.glob("fastppo/**/*.py"),
        *ROOT.glob("kernels/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("bench/**/*.py"),
    ]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(
                a.name == "kernels" or a.name.startswith("kernels.") for a in node.names
            ):
                offenders.append(str(path))
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and (node.module == "kernels" or node.module.startswith("kernels."))
            ):
                offenders.append(str(path))
    assert not offenders, f"top-level `kernels` imported in {offenders}"


def test_kernels_init_has_no_side_effects():
    """kernels/__init__.py holds a docstring and nothing else: importing fastppo.kernels imports no kernel
    module, touches no environment variable and does not import triton."""
    tree = ast.parse((ROOT / "kernels" / "__init__.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert body == [], "kernels/__init__.py must stay free of code"
    code = (
        "import os, sys; before = dict(os.environ); import fastppo.kernels; "
        "print(sorted(m for m in sys.modules if m.startswith('fastppo.kernels.')), dict(os.environ) == before)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[] True", out.stdout


def test_fastppo_import_does_not_need_triton_kernels():
    """`import fastppo` loads no Triton kernel module: the torch path works where triton cannot be imported."""
    code = "import sys, fastppo; print(sorted(m for m in sys.modules if m.startswith('fastppo.kernels.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_installed_metadata():
    spec = importlib.util.find_spec("fastppo.kernels.compile_check")
    assert spec is not None and spec.origin.startswith(str(ROOT / "kernels"))


def test_plain_pytest_works_without_pytest_benchmark():
    """No pytest-benchmark option in the config: the suite runs where the plugin is not installed."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:benchmark", "-p", "no:cacheprovider", "tests/test_backend.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _git_files(prefix: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return {line for line in out.stdout.splitlines() if not line.endswith(".pyc")}


@pytest.mark.slow
def test_sdist_carries_the_tests_and_they_collect(tmp_path):
    """The sdist holds every tracked file of tests/ and bench/ (conftest, helpers), the license and
    the changelog, and pytest collects the tests from the unpacked sdist."""
    import tarfile

    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    (sdist,) = tmp_path.glob("fastppo-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    want = _git_files("tests") | _git_files("bench") | {"LICENSE", "CHANGELOG.md", "CONTRIBUTING.md", "setup.py"}
    assert not want - names, sorted(want - names)
    (root,) = (tmp_path / "src").iterdir()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " tests collected" in out.stdout or "tests collected" in out.stdout


def test_readme_commands_are_what_ci_runs():
    """README's test command is the one .ci/run runs, and its install line names the CPU build's index
    (a plain `pip install torch` on Linux pulls a CUDA build of several GB)."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q" in readme
    assert [line for line in ci if "pytest" in line and not line.startswith("#")] == ["python -m pytest -q"]
    install = next(line for line in readme.splitlines() if line.startswith("pip install torch"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
