"""The wheel holds every module: fastppo/** (the trainer subpackage included) and kernels/** as fastppo.kernels."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_contains_every_module(tmp_path):
    # build from a copy: an in-tree build would write build/ and *.egg-info into the shared checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("fastppo", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fastppo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(src).as_posix() for p in (src / "fastppo").rglob("*.py")}
    expected |= {
        "fastppo/kernels/" + p.relative_to(src / "kernels").as_posix() for p in (src / "kernels").rglob("*.py")
    }
    assert "fastppo/trainer/trainer.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
