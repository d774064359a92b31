"""GAE: the PyTorch path and the Triton kernel (interpreted on CPU) against a plain float64 loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastppo
from fastppo.kernels import gae as gae_kernel
from fastppo.reference import advantages as ref
from tests._tol import assert_within_rule, kernel_device, requires_cuda

BACKENDS = ("torch", "triton")
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.7)]


def loop_gae(rewards, values, mask, gamma, lam):
    """Ground truth: the multi-turn recursion, written plainly, in float64."""
    r, v, m = rewards.double(), values.double(), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        nextvalue = lastgaelam = 0.0
        for t in reversed(range(T)):
            if m[b, t]:
                delta = r[b, t].item() + gamma * nextvalue - v[b, t].item()
                lastgaelam = delta + gamma * lam * lastgaelam
                adv[b, t] = lastgaelam
                nextvalue = v[b, t].item()
    ret = torch.where(m, adv + torch.where(m, v, 0.0), 0.0)
    return adv, ret


def loop_gae_vec(rewards, values, mask, gamma, lam):
    """The same recursion vectorized over rows (only the time loop): ground truth for long T."""
    r, v, m = rewards.double(), values.double(), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    nextvalue = torch.zeros(B, dtype=torch.float64)
    lastgaelam = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nextvalue - v[:, t]
        new = delta + gamma * lam * lastgaelam
        lastgaelam = torch.where(m[:, t], new, lastgaelam)
        nextvalue = torch.where(m[:, t], v[:, t], nextvalue)
        adv[:, t] = torch.where(m[:, t], new, 0.0)
    return adv, torch.where(m, adv + torch.where(m, v, 0.0), 0.0)


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl's compute_gae_advantage_return (multi-turn version), as written there, without the whitening."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def classic_gae(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's get_advantages_and_returns (the classic right-padded loop, as TRL writes it too)."""
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    values = action_mask * values
    rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def make(B, T, *, dtype=torch.float32, p_valid=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g).to(dtype)
    v = torch.randn(B, T, generator=g).to(dtype)
    m = torch.rand(B, T, generator=g) < p_valid  # holes in the middle of rows
    if B >= 3:
        m[1] = False  # an all-masked row
    return r, v, m


def run(backend, r, v, m, **kw):
    """fastppo.gae on ``backend``; the Triton backend runs on the GPU when kernels are compiled
    (``FASTPPO_TEST_CUDA=1`` on a GPU machine), under the interpreter on CPU tensors otherwise."""
    dev = kernel_device(backend)
    r, v, m = (x.to(dev) if isinstance(x, torch.Tensor) else x for x in (r, v, m))
    with fastppo.use_backend(backend):
        adv, ret = fastppo.gae(r, v, m, **kw)
    return adv.cpu(), ret.cpu()


# ---------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 7), (5, 64), (4, 65), (3, 200)])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_reference_matches_loop(B, T, gamma, lam):
    r, v, m = make(B, T)
    adv, ret = run("torch", r, v, m, gamma=gamma, lam=lam)
    adv64, ret64 = loop_gae(r, v, m, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reference_dtypes(dtype):
    r, v, m = make(4, 150, dtype=dtype)
    adv, ret = run("torch", r, v, m, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    adv64, ret64 = loop_gae(r, v, m, 0.99, 0.95)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(adv.double(), adv64, rtol=tol, atol=tol)
    torch.testing.assert_close(ret.double(), ret64, rtol=tol, atol=tol)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.999, 0.999), (0.3, 0.7), (0.0, 0.5)])
def test_reference_long_rows_stable(gamma, lam):
    # T = 8192: any c^(-t) rescaling would overflow here (0.21^-8192); sums of 8k terms stay accurate.
    r, v, m = make(2, 8192, p_valid=0.8)
    adv, ret = run("torch", r, v, m, gamma=gamma, lam=lam)
    adv64, ret64 = loop_gae_vec(r, v, m, gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    scale = adv64.abs().max().item() + 1
    torch.testing.assert_close(adv.double(), adv64, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(ret.double(), ret64, rtol=0, atol=2e-6 * scale)


def test_loops_agree():
    # The two ground truths (scalar and row-vectorized loops) are the same recursion.
    r, v, m = make(3, 40)
    for a, b in zip(loop_gae(r, v, m, 0.9, 0.8), loop_gae_vec(r, v, m, 0.9, 0.8)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- Triton kernel (interpreted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 37), (3, 1000)])  # 1000: 4 kernel blocks, not a multiple of 256
def test_triton_matches_loop(dtype, B, T):
    assert gae_kernel.BLOCK_T < 1000
    r, v, m = make(B, T, dtype=dtype)
    adv, ret = run("triton", r, v, m, gamma=0.99, lam=0.95)
    adv_t, ret_t = run("torch", r, v, m, gamma=0.99, lam=0.95)
    adv64, ret64 = loop_gae_vec(r, v, m, 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32
    assert_within_rule(adv, adv_t, adv64, atol=1e-5, name="advantages")
    assert_within_rule(ret, ret_t, ret64, atol=1e-5, name="returns")
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_triton_gamma_lam(gamma, lam):
    r, v, m = make(2, 300, seed=1)
    adv, ret = run("triton", r, v, m, gamma=gamma, lam=lam)
    adv64, ret64 = loop_gae_vec(r, v, m, gamma, lam)
    adv_t, ret_t = run("torch", r, v, m, gamma=gamma, lam=lam)
    assert_within_rule(adv, adv_t, adv64, atol=2e-5, name="advantages")
    assert_within_rule(ret, ret_t, ret64, atol=2e-5, name="returns")


def test_triton_path_is_taken(monkeypatch):
    calls = []
    real = gae_kernel.gae_forward

    def spy(*a):
        calls.append(a[0].shape)
        return real(*a)

    monkeypatch.setattr(gae_kernel, "gae_forward", spy)
    r, v, m = make(2, 5)
    run("triton", r, v, m)
    run("torch", r, v, m)
    run("auto", r, v, m)  # CPU tensors: auto means torch
    assert calls == [torch.Size([2, 5])]


def test_triton_long_row_odd_batch():
    # Carry across 5 blocks, mostly-masked rows (long masked runs span whole blocks).
    B, T = 3, 1100
    r, v, _ = make(B, T, seed=2)
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, :] = True
    m[1, ::97] = True
    m[2, 10:20] = True
    m[2, 900:905] = True
    adv, ret = run("triton", r, v, m, gamma=1.0, lam=1.0)
    adv64, ret64 = loop_gae_vec(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(adv.double(), adv64, rtol=0, atol=1e-4)
    torch.testing.assert_close(ret.double(), ret64, rtol=0, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_uses_kernel(dtype):
    r, v, m = (x.cuda() for x in make(7, 3000, dtype=dtype))
    adv, ret = fastppo.gae(r, v, m, gamma=0.99, lam=0.95)  # auto backend: the kernel on CUDA
    with fastppo.use_backend("torch"):
        adv_t, ret_t = fastppo.gae(r, v, m, gamma=0.99, lam=0.95)
    adv64, ret64 = loop_gae_vec(r.cpu(), v.cpu(), m.cpu(), 0.99, 0.95)
    assert adv.is_cuda and adv.dtype == torch.float32
    assert_within_rule(adv, adv_t, adv64, atol=1e-4, name="advantages")
    assert_within_rule(ret, ret_t, ret64, atol=1e-4, name="returns")


# ---------------------------------------------------------------- semantics, both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_verl_on_valid_positions(backend):
    r, v, m = make(4, 50, seed=3)
    adv, ret = run(backend, r, v, m, gamma=0.97, lam=0.9)
    va, vr = verl_gae(r.double(), v.double(), m.double(), 0.97, 0.9)
    torch.testing.assert_close(adv.double()[m], va[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double()[m], vr[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_padded_equals_classic_loop(backend):
    B, T = 5, 70
    r, v, _ = make(B, T, seed=4)
    lengths = torch.tensor([70, 1, 33, 0, 69])
    m = torch.arange(T)[None, :] < lengths[:, None]
    r[~m] = 123.0  # garbage on padding: the classic loop zeroes it
    v[~m] = -7.0
    adv, ret = run(backend, r, v, m, gamma=0.99, lam=0.95)
    ca, cr = classic_gae(v.double(), r.double(), m.double(), 0.99, 0.95)
    torch.testing.assert_close(adv.double(), ca, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), cr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_masked_values_do_not_leak(backend):
    r, v, m = make(3, 40, seed=5)
    r[~m] = float("nan")
    v[~m] = float("inf")
    v[0, ~m[0]] = float("-inf")
    adv, ret = run(backend, r, v, m, gamma=0.9, lam=0.9)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    adv64, ret64 = loop_gae(r, v, m, 0.9, 0.9)
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_mask_dtypes(backend):
    B, T = 3, 290
    r_big = torch.randn(T, 2 * B)  # transposed and strided views
    v_big = torch.randn(B, T, 3)
    m_big = torch.rand(T, B, 2) < 0.6
    r = r_big.t()[::2]
    v = v_big[..., 1]
    m = m_big[..., 0].t()
    assert not (r.is_contiguous() or v.is_contiguous() or m.is_contiguous())
    adv64, ret64 = loop_gae_vec(r, v, m, 0.95, 0.9)
    for mask in (m, m.to(torch.int64), m.to(torch.int8), m.to(torch.uint8).t().contiguous().t()):
        adv, ret = run(backend, r, v, mask, gamma=0.95, lam=0.9)
        torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes(backend):
    r, v, m = make(2, 30, seed=6)
    v = v.to(torch.bfloat16)
    adv, ret = run(backend, r, v, m, gamma=0.9, lam=0.8)
    adv64, ret64 = loop_gae(r, v, m, 0.9, 0.8)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad(backend):
    r, v, m = make(2, 9)
    r.requires_grad_()
    v.requires_grad_()
    adv, ret = run(backend, r, v, m)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for B, T in ((0, 5), (3, 0)):
        adv, ret = run(backend, torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool))
        assert adv.shape == ret.shape == (B, T)


def test_bad_inputs():
    r, v, m = make(2, 5)
    with pytest.raises(ValueError, match="rewards"):
        fastppo.gae(r[0], v[0], m[0])
    with pytest.raises(ValueError, match="values"):
        fastppo.gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="mask"):
        fastppo.gae(r, v, m[:1])
    with pytest.raises(TypeError, match="mask"):
        fastppo.gae(r, v, m.float())
    with pytest.raises(TypeError, match="rewards"):
        fastppo.gae(r.long(), v, m)
    with pytest.raises(TypeError, match="values"):
        fastppo.gae(r, v.numpy(), m)
    with pytest.raises(ValueError, match="mask"):
        fastppo.gae(r, v, m.to("meta"))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            fastppo.gae(r, v, m, gamma=bad)
        with pytest.raises(ValueError, match="lam"):
            fastppo.gae(r, v, m, lam=bad)
    # real-valued scalars of any kind are numbers (issue 11); a bool is not
    want = fastppo.gae(r, v, m, gamma=0.5)
    for scalar in (torch.tensor(0.5), np.float32(0.5), np.float64(0.5)):
        got = fastppo.gae(r, v, m, gamma=scalar)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(TypeError, match="gamma"):
        fastppo.gae(r, v, m, gamma=True)
    with pytest.raises(ValueError, match="gamma"):
        fastppo.gae(r, v, m, gamma=torch.tensor([0.5]))
    with pytest.raises(TypeError):
        fastppo.gae(r, v, m, 0.9, 0.9)  # options are keyword-only


# ---------------------------------------------------------------- properties (hypothesis)


@st.composite
def gae_case(draw, max_b=4, max_t=40):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    p = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) < p
    return r, v, m


unit = st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.999, 1.0]) | st.floats(0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(case=gae_case(), gamma=unit, lam=unit)
def test_property_reference_equals_loop(case, gamma, lam):
    r, v, m = case
    adv, ret = run("torch", r, v, m, gamma=gamma, lam=lam)
    adv64, ret64 = loop_gae_vec(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, adv64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret64, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(case=gae_case())
def test_property_undiscounted_is_future_reward_minus_value(case):
    # gamma = lam = 1: the TD errors telescope, A_t = sum of valid rewards at s >= t - v_t.
    r, v, m = case
    adv, ret = run("torch", r, v, m, gamma=1.0, lam=1.0)
    future = torch.where(m, r, 0.0).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, torch.where(m, future - v, 0.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, torch.where(m, future, 0.0), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(case=gae_case(), gamma=unit)
def test_property_lam_zero_is_one_step_td(case, gamma):
    r, v, m = case
    adv, _ = run("torch", r, v, m, gamma=gamma, lam=0.0)
    adv64, _ = loop_gae_vec(r, v, m, gamma, 0.0)
    torch.testing.assert_close(adv, adv64, rtol=1e-12, atol=1e-12)
    if gamma == 0.0:
        torch.testing.assert_close(adv, torch.where(m, r - v, 0.0), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gae_case(max_t=20), gamma=unit, lam=unit, data=st.data())
def test_property_masked_columns_are_skipped(case, gamma, lam, data):
    # Inserting masked columns (holding garbage) anywhere leaves the valid outputs unchanged.
    r, v, m = case
    T = r.shape[1]
    n_ins = data.draw(st.integers(1, 6))
    where = sorted(data.draw(st.lists(st.integers(0, T), min_size=n_ins, max_size=n_ins)))
    keep = []
    for col in range(T + 1):
        keep += [-1] * where.count(col)
        if col < T:
            keep.append(col)
    keep = torch.tensor(keep)
    src = keep.clamp_min(0)
    inserted = keep < 0
    r2 = torch.where(inserted, float("nan"), r[:, src])
    v2 = torch.where(inserted, 1e30, v[:, src])
    m2 = m[:, src] & ~inserted
    adv, ret = run("torch", r, v, m, gamma=gamma, lam=lam)
    adv2, ret2 = run("torch", r2, v2, m2, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv2[:, ~inserted], adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret2[:, ~inserted], ret, rtol=1e-12, atol=1e-12)
    assert (adv2[:, inserted] == 0).all()


@settings(max_examples=12, deadline=None)
@given(case=gae_case(max_b=3, max_t=300), gamma=unit, lam=unit)
def test_property_triton_equals_loop(case, gamma, lam):
    r, v, m = (x.float() if x.is_floating_point() else x for x in case)
    adv, ret = run("triton", r, v, m, gamma=gamma, lam=lam)
    adv64, ret64 = loop_gae_vec(r, v, m, gamma, lam)
    scale = adv64.abs().max().item() + 1
    torch.testing.assert_close(adv.double(), adv64, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(ret.double(), ret64, rtol=0, atol=2e-6 * scale)


def test_reference_block_boundaries():
    # Rows whose valid count straddles the PyTorch path's block (64 slots) and its multiples.
    L = ref.GAE_BLOCK
    for T in (L - 1, L, L + 1, 2 * L, 3 * L + 5):
        r, v, _ = make(2, T, seed=T)
        m = torch.ones(2, T, dtype=torch.bool)
        m[1, T // 2] = False
        adv, ret = run("torch", r, v, m, gamma=0.9, lam=0.95)
        adv64, ret64 = loop_gae_vec(r, v, m, 0.9, 0.95)
        torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)
