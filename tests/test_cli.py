"""The ``fastppo`` command line."""

import os
import subprocess
import sys

import pytest


def _info(**env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-m", "fastppo.cli", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return dict(line.split(None, 1) for line in out.stdout.splitlines())


@pytest.mark.parametrize("interpret", [False, True])
def test_info_says_how_kernels_run_and_whether_flash_attn_is_there(interpret):
    info = _info(**({"TRITON_INTERPRET": "1"} if interpret else {}))
    assert {"fastppo", "torch", "triton", "transformers", "backend", "kernels", "flash-attn"} <= info.keys()
    if interpret:
        assert info["kernels"].startswith("interpreted")
    else:
        assert info["kernels"].startswith("compiled")
    assert info["flash-attn"].startswith(("not installed", "2."))
