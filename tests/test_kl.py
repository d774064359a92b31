"""fastppo.kl_penalty: reference and Triton kernels against a plain float64 loop.

The Triton cases run under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), or on
the GPU with compiled kernels under ``FASTPPO_TEST_CUDA=1``: then their inputs (and the upstream
gradient) are CUDA copies (same values, same layouts, see ``tests._tol.kernel_device``) and the results
come back to the CPU, where the float64 loop and the torch backend run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo.losses import KL_KINDS
from tests._losses import LOW_PRECISION, check_bad_input
from tests._tol import assert_within_rule, relayout, requires_cuda, to_cpu, to_kernel_device


def loop_kl(lp, ref, kind, mask=None):
    """Plain float64 loop: per-token (k, dk/dd) with d = lp - ref; 0 and 0 where masked."""
    shape = lp.shape
    D = (lp.detach().double() - ref.detach().double()).flatten().tolist()
    M = [True] * len(D) if mask is None else mask.bool().flatten().tolist()
    ks, gs = [], []
    for d, m in zip(D, M):
        if not m:
            k = g = 0.0
        elif kind == "k1":
            k, g = d, 1.0
        elif kind == "abs":
            k, g = abs(d), (d > 0) - (d < 0)
        elif kind == "k2":
            k, g = 0.5 * d * d, d
        else:
            dc = min(max(d, -20.0), 20.0)
            raw = math.exp(-dc) + dc - 1.0
            k = min(max(raw, 0.0), 10.0)  # k3 >= 0; the floor only guards rounding (gradient passes)
            g = 1.0 - math.exp(-dc) if (-20.0 <= d <= 20.0 and raw <= 10.0) else 0.0
        ks.append(k)
        gs.append(float(g))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(shape)  # noqa: E731
    return as_t(ks), as_t(gs)


def make_inputs(shape, *, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(shape, generator=g)
    ref = lp + spread * torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    w = torch.randn(shape, generator=g)
    return lp, ref, mask, w


def run(backend, lp, ref, kind, mask=None, weights=None, need=(True, True)):
    """Forward, then grads of (k * weights).sum() (or k.sum(): a stride-0 grad_output) w.r.t. both inputs.

    The CPU tensors move to the backend's test device (CUDA for compiled Triton kernels); the KL and
    the gradients come back on the CPU."""
    lp, ref, mask, weights = to_kernel_device(lp, ref, mask, weights, backend=backend)
    lp = lp.detach().requires_grad_(need[0])
    ref = ref.detach().requires_grad_(need[1])
    with fastppo.use_backend(backend):
        k = fastppo.kl_penalty(lp, ref, kind=kind, mask=mask)
    obj = k.sum() if weights is None else (k * weights).sum()
    inputs = [x for x, n in zip((lp, ref), need) if n]
    grads = list(torch.autograd.grad(obj, inputs))
    return to_cpu((k, (grads.pop(0) if need[0] else None), (grads.pop(0) if need[1] else None)))


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_loop(kind, dtype):
    lp, ref, mask, w = (x.to(dtype) if x.is_floating_point() else x for x in make_inputs((2, 3, 7)))
    for m in (None, mask):
        k, g_lp, g_ref = run("torch", lp, ref, kind, m, w)
        want, want_g = loop_kl(lp, ref, kind, m)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert k.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(k.double(), want, atol=tol, rtol=tol)
        torch.testing.assert_close(g_lp.double(), w.double() * want_g, atol=tol, rtol=tol)
        torch.testing.assert_close(g_ref.double(), -w.double() * want_g, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_reference_gradcheck(kind):
    lp, ref, mask, _ = (x.double() if x.is_floating_point() else x for x in make_inputs((3, 5)))
    lp.requires_grad_()
    ref.requires_grad_()
    for m in (None, mask):
        fn = lambda a, b, m=m: fastppo.reference.losses.kl_penalty(a, b, kind=kind, mask=m)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (lp, ref), eps=1e-6, atol=1e-8)


CASES = {
    # name: (shape, layout, mask: None/"bool"/"int", grad_output: "weights"/"sum")
    "2d": ((3, 37), "contiguous", None, "weights"),
    "3d_slice_intmask": ((2, 3, 5), "slice", "int", "weights"),
    "1x1": ((1, 1), "contiguous", "bool", "sum"),
    "two_blocks_transpose": ((2, 1100), "transpose", "bool", "sum"),
    "permute_3d": ((3, 2, 11), "permute", "bool", "weights"),
    "1d": ((13,), "contiguous", None, "sum"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_matches_loop(case, kind, dtype):
    shape, layout, mask_kind, gout = CASES[case]
    lp, ref, mask, w = make_inputs(shape)
    inputs = (lp.to(dtype), ref.to(dtype), None if mask_kind is None else mask.long() if mask_kind == "int" else mask)
    lp, ref, mask = (None if x is None else relayout(x, layout) for x in inputs)
    k_lp_in, k_ref_in, k_mask = (None if x is None else relayout(x, layout) for x in to_kernel_device(*inputs))
    assert (k_lp_in.stride(), k_ref_in.stride()) == (
        lp.stride(),
        ref.stride(),
    )  # the layout made on the kernel's device
    assert mask is None or k_mask.stride() == mask.stride()
    w = w if gout == "weights" else None
    want, want_g = loop_kl(lp, ref, kind, mask)
    want_g = want_g if w is None else want_g * w.double()
    t_k, t_lp, t_ref = run("torch", lp, ref, kind, mask, w)
    k_k, k_lp, k_ref = run("triton", k_lp_in, k_ref_in, kind, k_mask, w)

    assert k_k.dtype == torch.float32 and k_k.shape == lp.shape
    assert k_lp.dtype == dtype and k_ref.dtype == dtype
    eps32 = torch.finfo(torch.float32).eps
    assert_within_rule(k_k, t_k, want, atol=4 * eps32 * max(1.0, want.abs().max().item()), name="kl")
    g_atol = 4 * torch.finfo(dtype).eps * max(1.0, want_g.abs().max().item())
    assert_within_rule(k_lp, t_lp, want_g, atol=g_atol, name="grad logprobs")
    assert_within_rule(k_ref, t_ref, -want_g, atol=g_atol, name="grad ref_logprobs")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KL_KINDS)
def test_extreme_log_ratios(backend, kind):
    """k3: d clamped to [-20, 20] before exp, result to [0, 10]; gradients stay finite (0 where clamped)."""
    d = torch.tensor([-1000.0, -30.0, -20.0, -2.0, 0.0, 0.5, 2.0, 20.0, 25.0, 1000.0])
    lp = torch.full_like(d, -1.0)
    ref = lp - d
    k, g_lp, g_ref = run(backend, lp, ref, kind)
    want, want_g = loop_kl(lp, ref, kind)
    torch.testing.assert_close(k.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_lp.double(), want_g, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_ref.double(), -want_g, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(g_lp).all() and torch.isfinite(g_ref).all()
    if kind == "k3":
        assert k.max().item() == 10.0 and g_lp[[0, 1, 9]].abs().sum().item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KL_KINDS)
def test_mask_zero_and_no_leak(backend, kind):
    lp, ref, mask, w = make_inputs((3, 10))
    clean = run(backend, lp, ref, kind, mask, w)
    lp2, ref2 = lp.clone(), ref.clone()
    lp2[~mask], ref2[~mask] = math.nan, math.inf
    dirty = run(backend, lp2, ref2, kind, mask, w)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
        assert torch.equal(b[~mask], torch.zeros(int((~mask).sum()), dtype=b.dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_gradient_to_one_input(backend, need):
    lp, ref, mask, w = make_inputs((2, 9))
    _want, want_g = loop_kl(lp, ref, "k3", mask)
    _, g_lp, g_ref = run(backend, lp, ref, "k3", mask, w, need=need)
    got = g_lp if need[0] else -g_ref
    assert (g_lp is None) == (not need[0]) and (g_ref is None) == (not need[1])
    torch.testing.assert_close(got.double(), w.double() * want_g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_and_no_grad(backend):
    """bf16 logprobs with fp32 ref (compiled as is) or fp16 ref (converted to fp32); each gradient in its dtype."""
    lp, ref, mask, w = make_inputs((2, 9))
    lp = lp.bfloat16()
    for r in (ref, ref.half()):
        k, g_lp, g_ref = run(backend, lp, r, "k2", mask, w)
        want, want_g = loop_kl(lp, r, "k2", mask)
        assert k.dtype == torch.float32 and g_lp.dtype == torch.bfloat16 and g_ref.dtype == r.dtype
        torch.testing.assert_close(k.double(), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_ref.double(), -w.double() * want_g, atol=1e-3, rtol=1e-2)
    with fastppo.use_backend(backend):
        k = fastppo.kl_penalty(*to_kernel_device(lp, ref, backend=backend), kind="k3")
    assert not k.requires_grad and torch.isfinite(k).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_dim(backend):
    lp, ref = to_kernel_device(torch.tensor(-1.0), torch.tensor(-1.5), backend=backend)
    lp.requires_grad_()
    with fastppo.use_backend(backend):
        k = fastppo.kl_penalty(lp, ref, kind="k2")
    k.backward()
    assert k.shape == () and k.item() == pytest.approx(0.125) and lp.grad.item() == pytest.approx(0.5)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    spread=st.floats(0.0, 40.0),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_property_estimators(shape, seed, spread, backend):
    """abs = |k1|, k2 = k1^2 / 2, 0 <= k3 <= 10, and the k3 gradient is finite."""
    lp, ref, _, _ = make_inputs(shape, seed=seed, spread=spread)
    with fastppo.use_backend(backend):
        k1, ab, k2, k3 = (
            fastppo.kl_penalty(*to_kernel_device(lp, ref, backend=backend), kind=kind) for kind in KL_KINDS
        )
    torch.testing.assert_close(ab, k1.abs())
    torch.testing.assert_close(k2, 0.5 * k1 * k1)
    assert (k3 >= 0).all() and (k3 <= 10).all()
    _, g, _ = run(backend, lp, ref, "k3")
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"logprobs": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "logprobs must be a floating-point"),
        ({"ref_logprobs": torch.zeros(2, 4, dtype=torch.int8)}, TypeError, "ref_logprobs must be a floating-point"),
        ({"ref_logprobs": torch.zeros(2, 5)}, ValueError, "ref_logprobs must have shape"),
        ({"ref_logprobs": torch.zeros(2, 4, device="meta")}, ValueError, "ref_logprobs is on meta"),
        ({"kind": "kl"}, ValueError, "kind must be one of"),
        ({"kind": "low_var_kl"}, ValueError, "kind must be one of"),
        ({"mask": torch.ones(2, 4)}, TypeError, "mask must be a bool or integer"),
        ({"mask": torch.ones(4, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool, device="meta")}, ValueError, "mask is on meta"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(change, exc, match, backend):
    args = {"logprobs": torch.zeros(2, 4), "ref_logprobs": torch.zeros(2, 4)}
    check_bad_input(fastppo.kl_penalty, args, change, exc, match, backend)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mixed_cpu_cuda_inputs(backend):
    """A CPU mask with CUDA inputs is a ValueError naming the mask, on every backend."""
    lp, ref, mask, _ = make_inputs((2, 4))
    with fastppo.use_backend(backend), pytest.raises(ValueError, match="mask is on cpu but logprobs is on cuda"):
        fastppo.kl_penalty(lp.cuda(), ref.cuda(), kind="k3", mask=mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k3_never_negative_near_zero(backend):
    """exp(-d) + d - 1 rounds below 0 for |d| near float32 epsilon; k3 must not."""
    d = torch.tensor([1e-6, -1e-6, 3e-7, -3e-7, 1e-8, 0.0, 2.0**-20, -(2.0**-20)])
    lp = torch.randn(d.shape) * 3
    lp, ref = to_kernel_device(lp, lp - d, backend=backend)
    lp.requires_grad_()
    ref.requires_grad_()
    with fastppo.use_backend(backend):
        k3 = fastppo.kl_penalty(lp, ref, kind="k3")
    assert (k3 >= 0).all(), k3
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all() and lp.grad.abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k3_relative_accuracy_at_small_log_ratios(backend):
    """exp(-d) + d - 1 cancels every bit at |d| ~ 1e-4 in float32: k3 would be 0 where it is ~5e-9, and the
    mean k3 of a near-on-policy batch biased by +200 %. k3 and its gradient keep float32's relative accuracy
    at any d."""
    d = torch.tensor(
        [1e-4, -1e-4, 3e-4, 1e-3, -3e-3, 1e-2, 0.3, -0.49, 0.51, -0.7, 2.0, -2.0]
    )  # k3 below its clamp at 10
    ref = torch.zeros_like(d)
    lp, ref_k = to_kernel_device(d.clone(), ref, backend=backend)
    lp.requires_grad_()
    with fastppo.use_backend(backend):
        k3 = fastppo.kl_penalty(lp, ref_k, kind="k3")
    k3.sum().backward()
    d64 = d.double()
    want = torch.expm1(-d64) + d64
    want_g = -torch.expm1(-d64)
    rel = ((to_cpu(k3).double() - want) / want).abs()
    rel_g = ((to_cpu(lp.grad).double() - want_g) / want_g).abs()
    assert rel.max() < 1e-6, rel
    assert rel_g.max() < 1e-6, rel_g
