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
