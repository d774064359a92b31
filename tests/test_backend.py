"""Backend selection: FASTPPO_BACKEND and use_backend."""

import pytest
import torch

import fastppo
from fastppo._backend import use_triton


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    assert fastppo.get_backend() == "auto"
    assert use_triton(torch.zeros(2)) is False  # auto: CPU tensors take the torch path


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    assert fastppo.get_backend() == "torch"
    with fastppo.use_backend("triton"):
        assert fastppo.get_backend() == "triton"
        with fastppo.use_backend("torch"):
            assert fastppo.get_backend() == "torch"
        assert fastppo.get_backend() == "triton"
    assert fastppo.get_backend() == "torch"


def test_triton_on_cpu_runs_under_interpreter():
    # conftest sets TRITON_INTERPRET=1, so forcing triton on CPU tensors is allowed.
    with fastppo.use_backend("triton"):
        assert use_triton(torch.zeros(2)) is True


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend"), fastppo.use_backend("cuda"):
        pass
    monkeypatch.setenv("FASTPPO_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND"):
        fastppo.get_backend()


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert fastppo.masked_mean(x, m).item() == pytest.approx(1.5)
    row = fastppo.masked_mean(x, m, dim=-1)
    assert row.tolist() == [1.5, 0.0]  # all-masked row gives 0, and the NaN under the mask never leaks
    with pytest.raises(TypeError, match="mask"):
        fastppo.masked_mean(x, m.float())
    with pytest.raises(ValueError, match="mask"):
        fastppo.masked_mean(x, m[:, :2])


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """Without TRITON_INTERPRET=1 every op forced onto Triton with CPU tensors raises fastppo's own
    error, not Triton's "Cannot call @triton.jit'd outside of the scope of a kernel"."""
    import os
    import subprocess
    import sys

    code = """
import torch, fastppo
x, m = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool)
ops = {
    "logprobs_and_entropy": lambda: fastppo.logprobs_and_entropy(x, torch.zeros(2, dtype=torch.long)),
    "linear_logprobs_and_entropy": lambda: fastppo.linear_logprobs_and_entropy(x, x, torch.zeros(2, dtype=torch.long)),
    "policy_loss": lambda: fastppo.policy_loss(x, x, x, m),
    "value_loss": lambda: fastppo.value_loss(x, x, x, m),
    "kl_penalty": lambda: fastppo.kl_penalty(x, x),
    "gae": lambda: fastppo.gae(x, x, m),
}
for name, op in ops.items():
    try:
        op()
        print(name, "ran")
    except RuntimeError as e:
        print(name, "TRITON_INTERPRET=1" in str(e))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTPPO_BACKEND"] = "triton"
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.split("\n")[:-1]
    assert lines == [
        f"{name} True"
        for name in (
            "logprobs_and_entropy",
            "linear_logprobs_and_entropy",
            "policy_loss",
            "value_loss",
            "kl_penalty",
            "gae",
        )
    ], out.stdout + out.stderr
