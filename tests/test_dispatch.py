"""The dispatch layer and the validator every public op goes through (fastppo/_dispatch.py, _checks.py)."""

import importlib

import numpy as np
import pytest
import torch

import fastppo

B, T, V, H = 2, 5, 7, 4


def _inputs(dtype=torch.float32, t=T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, t, generator=g, dtype=dtype)
    mask = torch.ones(B, t, dtype=torch.bool)
    return x, mask


def _ops(dtype=torch.float32, t=T):
    """Every public op with a kernel: name -> (kernel "module:function", a call)."""
    x, m = _inputs(dtype, t)
    logits = torch.randn(B, t, V, dtype=dtype)
    labels = torch.zeros(B, t, dtype=torch.long)
    hidden, weight = torch.randn(B, t, H, dtype=dtype), torch.randn(V, H, dtype=dtype)
    return {
        "logprobs_and_entropy": (
            "logprobs:logprobs_and_entropy_triton",
            lambda: fastppo.logprobs_and_entropy(logits, labels),
        ),
        "linear_logprobs_and_entropy": (
            "linear_logprobs:linear_logprobs_and_entropy_triton",
            lambda: fastppo.linear_logprobs_and_entropy(hidden, weight, labels),
        ),
        "policy_loss": ("policy_loss:policy_loss_triton", lambda: fastppo.policy_loss(x, x, x, m)),
        "value_loss": ("value_loss:value_loss_triton", lambda: fastppo.value_loss(x, x, x, m)),
        "kl_penalty": ("kl:kl_penalty_triton", lambda: fastppo.kl_penalty(x, x, mask=m)),
        "gae": ("gae:gae_forward", lambda: fastppo.gae(x, x, m)),
    }


def test_every_public_op_has_a_profiler_range():
    x, m = _inputs()
    calls = {name: call for name, (_, call) in _ops().items()}
    calls["masked_mean"] = lambda: fastppo.masked_mean(x, m)
    calls["masked_whiten"] = lambda: fastppo.masked_whiten(x, m)
    calls["group_advantages"] = lambda: fastppo.group_advantages(x.flatten(), 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for call in calls.values():
            call()
    names = {e.name for e in prof.events()}
    assert {f"fastppo.{name}" for name in calls} <= names, sorted(n for n in names if n.startswith("fastppo"))


def _forbid_kernels(monkeypatch):
    for kernel, _ in _ops().values():
        module, name = kernel.split(":")
        mod = importlib.import_module(f"fastppo.kernels.{module}")

        def boom(*args, _name=name, **kwargs):
            raise AssertionError(f"kernel {_name} ran")

        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("case", ["float64", "empty"])
def test_float64_and_empty_inputs_take_the_reference(monkeypatch, case):
    """Under a forced Triton backend, float64 and empty inputs still run the reference, every op."""
    _forbid_kernels(monkeypatch)
    ops = _ops(torch.float64) if case == "float64" else _ops(t=0)
    with fastppo.use_backend("triton"):
        for _, call in ops.values():
            call()  # the kernel would raise
    with fastppo.use_backend("triton"), pytest.raises(AssertionError, match="kernel"):
        _ops()["policy_loss"][1]()  # and the guard itself works: float32 does reach the kernel


@pytest.mark.parametrize(
    "scalar", [np.float32(0.7), np.float64(0.7), torch.tensor(0.7), torch.tensor(0.7, dtype=torch.float64)]
)
def test_numpy_and_0dim_tensor_scalars_are_numbers(scalar):
    x, m = _inputs()
    want = fastppo.policy_loss(x, x + 0.1, x, m, clip_low=0.7)[0]
    assert torch.equal(fastppo.policy_loss(x, x + 0.1, x, m, clip_low=scalar)[0], want)
    logits, labels = torch.randn(3, V), torch.zeros(3, dtype=torch.long)
    want = fastppo.logprobs_and_entropy(logits, labels, temperature=0.7)[0]
    assert torch.equal(fastppo.logprobs_and_entropy(logits, labels, temperature=scalar)[0], want)
    assert torch.equal(
        fastppo.value_loss(x, x, x + 1, m, clip=scalar)[0], fastppo.value_loss(x, x, x + 1, m, clip=0.7)[0]
    )
    s = torch.arange(4.0)
    assert torch.equal(fastppo.group_advantages(s, np.int64(2)), fastppo.group_advantages(s, 2))
    assert torch.equal(
        fastppo.masked_whiten(x, m, shift_mean=np.bool_(False)), fastppo.masked_whiten(x, m, shift_mean=False)
    )


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor(True), "0.7", None])
def test_bools_and_strings_are_not_numbers(bad):
    x, m = _inputs()
    with pytest.raises(TypeError, match="clip_low"):
        fastppo.policy_loss(x, x, x, m, clip_low=bad)


def test_integer_arguments_reject_floats():
    with pytest.raises(TypeError, match="group_size"):
        fastppo.group_advantages(torch.arange(4.0), 2.0)
    with pytest.raises(TypeError, match="ignore_index"):
        fastppo.logprobs_and_entropy(torch.randn(3, V), torch.zeros(3, dtype=torch.long), ignore_index=-100.0)


def test_value_head_output_with_a_trailing_1_blames_values():
    """A [B, T, 1] value-head output next to [B, T] old values, returns and mask names `values`."""
    x, m = _inputs()
    with pytest.raises(ValueError, match=r"^values must have shape \(2, 5\) .*squeeze") as err:
        fastppo.value_loss(x[..., None], x, x, m)
    assert "old_values, returns, mask" in str(err.value)
    with pytest.raises(ValueError, match=r"^advantages must have shape"):
        fastppo.policy_loss(x, x, x[:, :3], m)
    with pytest.raises(ValueError, match=r"^mask must have shape"):
        fastppo.policy_loss(x, x, x, m[:, :3])
