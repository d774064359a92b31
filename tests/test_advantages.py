"""masked_whiten and group_advantages against plain float64 loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo


def loop_whiten(x, mask, shift_mean=True):
    xs = [float(a) for a, k in zip(x.double().flatten().tolist(), mask.bool().flatten().tolist()) if k]
    n = len(xs)
    mean = sum(xs) / n if n else 0.0
    var = sum((a - mean) ** 2 for a in xs) / (n - 1) if n >= 2 else 0.0
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for i, (a, k) in enumerate(zip(x.double().flatten().tolist(), mask.bool().flatten().tolist())):
        if k:
            out[i] = (a - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out.view(x.shape)


def verl_masked_whiten(values, mask, shift_mean=True):
    """verl.utils.torch_functional.masked_whiten, as written there (raises for < 2 valid positions)."""

    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum()

    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def loop_group(scores, G, kind, scale, eps):
    s = [float(a) for a in scores.double().tolist()]
    out = []
    for g in range(len(s) // G):
        grp = s[g * G : (g + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((a - mean) ** 2 for a in grp) / (G - 1)) if G > 1 else 0.0
        for i, a in enumerate(grp):
            if kind == "grpo":
                adv = a - mean
            else:
                others = grp[:i] + grp[i + 1 :]
                adv = a - sum(others) / len(others)
            out.append(adv / (std + eps) if scale and G > 1 else adv)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- masked_whiten


@pytest.mark.parametrize("shape", [(1,), (7,), (4, 33), (2, 3, 5)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(shape, shift_mean):
    x = torch.randn(shape) * 3 + 1.5
    m = torch.rand(shape) < 0.7
    m.view(-1)[:2] = True
    out = fastppo.masked_whiten(x, m, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), loop_whiten(x, m, shift_mean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_verl_on_valid_positions(shift_mean):
    x = torch.randn(5, 40, dtype=torch.float64)
    m = torch.rand(5, 40) < 0.6
    out = fastppo.masked_whiten(x, m, shift_mean=shift_mean)
    ref = verl_masked_whiten(x, m.double(), shift_mean)
    torch.testing.assert_close(out[m], ref[m], rtol=1e-12, atol=1e-12)
    assert (out[~m] == 0).all()


def test_whiten_whitens():
    x = torch.randn(8, 100, dtype=torch.float64) * 5 + 3
    m = torch.rand(8, 100) < 0.5
    out = fastppo.masked_whiten(x, m)
    assert abs(out[m].mean().item()) < 1e-10
    assert abs(out[m].std().item() - 1) < 1e-6


def test_whiten_few_valid_positions():
    x = torch.tensor([3.0, float("nan"), float("inf"), -2.0])
    one = torch.tensor([False, False, False, True])
    none = torch.zeros(4, dtype=torch.bool)
    torch.testing.assert_close(fastppo.masked_whiten(x, one), torch.zeros(4))  # var 0: x - mean = 0
    torch.testing.assert_close(fastppo.masked_whiten(x, one, shift_mean=False), torch.tensor([0, 0, 0, -2.0]))
    torch.testing.assert_close(fastppo.masked_whiten(x, none), torch.zeros(4))
    two = torch.tensor([True, False, False, True])
    out = fastppo.masked_whiten(x, two)
    assert torch.isfinite(out).all()  # NaN/inf on masked positions do not leak
    torch.testing.assert_close(out.double(), loop_whiten(x.nan_to_num(0, 0, 0), two), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_whiten_dtypes_and_non_contiguous(dtype):
    x = torch.randn(30, 6).to(dtype).t()
    m = (torch.rand(6, 30) < 0.5).to(torch.int64)
    out = fastppo.masked_whiten(x, m)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), loop_whiten(x, m), rtol=tol, atol=tol)


def test_whiten_no_grad_and_bad_inputs():
    x = torch.randn(4, 5, requires_grad=True)
    m = torch.ones(4, 5, dtype=torch.bool)
    assert not fastppo.masked_whiten(x, m).requires_grad
    with pytest.raises(ValueError, match="mask"):
        fastppo.masked_whiten(x, m[:2])
    with pytest.raises(TypeError, match="mask"):
        fastppo.masked_whiten(x, m.float())
    with pytest.raises(TypeError, match="x"):
        fastppo.masked_whiten(x.long(), m)
    with pytest.raises(TypeError):
        fastppo.masked_whiten(x, m, False)  # keyword-only


# ---------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", [True, False])
def test_group_matches_loop(G, kind, scale):
    scores = torch.randn(5 * G)
    out = fastppo.group_advantages(scores, G, kind=kind, scale=scale)
    assert out.shape == scores.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), loop_group(scores, G, kind, scale, 1e-6), rtol=1e-5, atol=1e-5)


def test_group_defaults():
    scores = torch.randn(12, dtype=torch.float64)
    # grpo scales by default (GRPO); rloo does not (verl, RLOO paper)
    torch.testing.assert_close(
        fastppo.group_advantages(scores, 4), torch.as_tensor(loop_group(scores, 4, "grpo", True, 1e-6))
    )
    torch.testing.assert_close(
        fastppo.group_advantages(scores, 4, kind="rloo"), torch.as_tensor(loop_group(scores, 4, "rloo", False, 1e-6))
    )


def test_rloo_is_rescaled_grpo():
    # s - mean(others) = G/(G-1) * (s - mean_g): RLOO advantages are unscaled GRPO ones times G/(G-1).
    scores = torch.randn(20, dtype=torch.float64)
    rloo = fastppo.group_advantages(scores, 5, kind="rloo")
    grpo = fastppo.group_advantages(scores, 5, scale=False)
    torch.testing.assert_close(rloo, grpo * 5 / 4)


def test_group_edge_cases():
    s = torch.tensor([1.0, 2.0, 3.0])
    assert (fastppo.group_advantages(s, 1) == 0).all()  # a lone sample: 0, not NaN
    eq = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    for kind in ("grpo", "rloo"):
        assert (fastppo.group_advantages(eq, 3, kind=kind, scale=True) == 0).all()
    ints = torch.tensor([1, 0, 0, 1, 1, 1])
    out = fastppo.group_advantages(ints, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), loop_group(ints, 3, "grpo", True, 1e-6), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fastppo.group_advantages(ints.bool(), 3), out)
    assert fastppo.group_advantages(torch.randn(4, dtype=torch.float64), 2).dtype == torch.float64
    bf = torch.randn(6).to(torch.bfloat16)
    torch.testing.assert_close(
        fastppo.group_advantages(bf, 3).double(), loop_group(bf, 3, "grpo", True, 1e-6), rtol=1e-5, atol=1e-5
    )
    strided = torch.randn(12)[::2]
    torch.testing.assert_close(fastppo.group_advantages(strided, 3), fastppo.group_advantages(strided.contiguous(), 3))
    assert fastppo.group_advantages(torch.zeros(0), 4).shape == (0,)


def test_group_eps():
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    std = math.sqrt(0.5)
    torch.testing.assert_close(
        fastppo.group_advantages(s, 2, eps=0.1), torch.tensor([-0.5, 0.5], dtype=torch.float64) / (std + 0.1)
    )


def test_group_bad_inputs():
    s = torch.randn(6)
    with pytest.raises(ValueError, match="group_size"):
        fastppo.group_advantages(s, 1, kind="rloo")
    with pytest.raises(ValueError, match="group_size"):
        fastppo.group_advantages(s, 0)
    with pytest.raises(ValueError, match="group_size"):
        fastppo.group_advantages(s, 4)
    with pytest.raises(TypeError, match="group_size"):
        fastppo.group_advantages(s, 2.0)
    with pytest.raises(ValueError, match="kind"):
        fastppo.group_advantages(s, 2, kind="ppo")
    with pytest.raises(ValueError, match="scores"):
        fastppo.group_advantages(s.view(2, 3), 3)
    with pytest.raises(TypeError, match="scores"):
        fastppo.group_advantages([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="eps"):
        fastppo.group_advantages(s, 2, eps=-1.0)
    with pytest.raises(TypeError, match="scale"):
        fastppo.group_advantages(s, 2, scale="yes")
    with pytest.raises(TypeError):
        fastppo.group_advantages(s, 2, "rloo")  # keyword-only


@settings(max_examples=50, deadline=None)
@given(
    G=st.integers(2, 9),
    n_groups=st.integers(1, 5),
    kind=st.sampled_from(["grpo", "rloo"]),
    scale=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_property(G, n_groups, kind, scale, seed):
    s = torch.randn(G * n_groups, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = fastppo.group_advantages(s, G, kind=kind, scale=scale)
    torch.testing.assert_close(out, loop_group(s, G, kind, scale, 1e-6), rtol=1e-10, atol=1e-10)
    # advantages sum to zero within each group, for both estimators
    torch.testing.assert_close(out.view(-1, G).sum(1), torch.zeros(n_groups, dtype=torch.float64), rtol=0, atol=1e-9)
