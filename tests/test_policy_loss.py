"""fastppo.policy_loss: reference and Triton kernel against a plain float64 loop.

The Triton cases run under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), or on
the GPU with compiled kernels under ``FASTPPO_TEST_CUDA=1``: then their inputs are CUDA copies (same
values, same layouts, see ``tests._tol.kernel_device``) and the results come back to the CPU, where the
float64 loop and the torch backend run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo.losses import AGGS
from tests._losses import (
    LOW_PRECISION,
    check_all_masked,
    check_bad_input,
    check_gradient_accumulation,
    check_kernel_matches_loop,
    check_masked_garbage_does_not_leak,
    loop_weights,
    random_mask,
    run_loss,
)
from tests._tol import requires_cuda, to_kernel_device

STATS = ("clip_frac", "clip_frac_lower", "approx_kl", "ratio_max", "ratio_min")


# ----------------------------------------------------------------------------- ground truth
def loop_policy(lp, old, adv, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", normalizer=None):
    """Plain float64 loop: returns (loss, dloss/dlp [shape of lp], stats dict, sum of |weighted loss terms|)."""
    ch = clip_low if clip_high is None else clip_high
    T = lp.shape[-1]
    LP, OLD, ADV = (x.detach().double().reshape(-1, T).tolist() for x in (lp, old, adv))
    M = mask.reshape(-1, T).bool().tolist()
    rows = len(LP)
    l_tok = [[0.0] * T for _ in range(rows)]
    g_tok = [[0.0] * T for _ in range(rows)]
    n = n_clip = n_lower = 0
    kl = 0.0
    rmax, rmin = -math.inf, math.inf
    for r in range(rows):
        for t in range(T):
            if not M[r][t]:
                continue
            a = ADV[r][t]
            d = LP[r][t] - OLD[r][t]
            dc = min(max(d, -20.0), 20.0)
            ratio = math.exp(dc)
            l1 = -a * ratio
            l2 = -a * min(max(ratio, 1.0 - clip_low), 1.0 + ch)
            loss = max(l1, l2)
            grad = 0.0 if l2 > l1 else -a * ratio
            if not -20.0 <= d <= 20.0:
                grad = 0.0
            n_clip += l2 > l1
            if dual_clip is not None and a < 0 and -a * dual_clip < loss:
                loss, grad = -a * dual_clip, 0.0
                n_lower += 1
            l_tok[r][t], g_tok[r][t] = loss, grad
            n += 1
            kl += (ratio - 1.0) - dc
            rmax, rmin = max(rmax, ratio), min(rmin, ratio)
    w = loop_weights(M, agg, normalizer)
    loss = sum(w[r] * sum(l_tok[r]) for r in range(rows))
    scale = sum(w[r] * sum(abs(x) for x in l_tok[r]) for r in range(rows))
    grad = torch.tensor([[w[r] * g for g in g_tok[r]] for r in range(rows)], dtype=torch.float64).reshape(lp.shape)
    den = max(n, 1)
    stats = {
        "clip_frac": n_clip / den,
        "clip_frac_lower": n_lower / den,
        "approx_kl": kl / den,
        "ratio_max": rmax if n else 1.0,
        "ratio_min": rmin if n else 1.0,
    }
    return loss, grad, stats, scale


# ----------------------------------------------------------------------------- inputs
def make_inputs(shape, *, seed=0, mask_kind="holes", spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(shape, generator=g)
    old = lp + spread * torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    return lp, old, adv, random_mask(shape, g, mask_kind)


def run(backend, lp, old, adv, mask, **opts):
    """fastppo.policy_loss on ``backend``: (loss, d loss / d lp, stats) on the CPU."""
    return run_loss(fastppo.policy_loss, backend, lp, old, adv, mask, **opts)


# ----------------------------------------------------------------------------- reference vs loop
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(
    "opts", [{}, {"clip_high": 0.28}, {"dual_clip": 1.5}, {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0}]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_loop(agg, opts, dtype):
    lp, old, adv, mask = (
        x.to(dtype) if x.is_floating_point() else x for x in make_inputs((2, 3, 9), mask_kind="row", spread=1.0)
    )
    loss, grad, stats = run("torch", lp, old, adv, mask, agg=agg, **opts)
    want, want_grad, want_stats, _ = loop_policy(lp, old, adv, mask, agg=agg, **opts)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.item() == pytest.approx(want, abs=tol, rel=tol)
    torch.testing.assert_close(grad.double(), want_grad, atol=tol, rtol=tol)
    for k in STATS:
        assert stats[k].dtype == torch.float32 and stats[k].shape == () and not stats[k].requires_grad
        assert stats[k].item() == pytest.approx(want_stats[k], abs=2e-6), k
    assert want_stats["clip_frac"] > 0 and (want_stats["clip_frac_lower"] > 0) == ("dual_clip" in opts)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_reference_gradcheck(agg, dual_clip):
    lp, old, adv, mask = (x.double() if x.is_floating_point() else x for x in make_inputs((3, 5), mask_kind="row"))
    lp.requires_grad_()

    def fn(x):
        return fastppo.reference.losses.policy_loss(x, old, adv, mask, clip_high=0.3, dual_clip=dual_clip, agg=agg)[0]

    assert torch.autograd.gradcheck(fn, (lp,), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- Triton vs loop
CASES = {
    # name: (shape, layout, mask kind, int mask, options)
    "2d": ((3, 37), "contiguous", "holes", False, {"clip_high": 0.28}),
    "3d_seqsum_dual": ((2, 3, 5), "contiguous", "row", False, {"agg": "seq-mean-token-sum", "dual_clip": 1.5}),
    "1x1": ((1, 1), "contiguous", "all", False, {"agg": "seq-mean-token-mean"}),
    "two_blocks_slice": (
        (2, 600),
        "slice",
        "row",
        False,
        {"agg": "seq-mean-token-mean", "clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0},
    ),
    "transpose_norm": ((5, 9), "transpose", "holes", True, {"normalizer": 100.0, "dual_clip": 2.0}),
    "seqsum_tensor_norm": (
        (4, 7),
        "slice",
        "row",
        False,
        {"agg": "seq-mean-token-sum", "normalizer": torch.tensor(3.0)},
    ),
    "permute_3d": ((3, 2, 11), "permute", "holes", False, {"agg": "seq-mean-token-mean", "dual_clip": 1.5}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_matches_loop(case, dtype):
    shape, layout, mask_kind, int_mask, opts = CASES[case]
    lp, old, adv, mask = make_inputs(shape, mask_kind=mask_kind)
    mask = mask.long() if int_mask else mask
    want_stats = check_kernel_matches_loop(
        fastppo.policy_loss, loop_policy, (lp, old, adv), mask, layout=layout, dtype=dtype, **opts
    )
    if shape[-1] > 5:  # the case exercises what it claims to
        assert want_stats["clip_frac"] > 0
        assert (want_stats["clip_frac_lower"] > 0) == ("dual_clip" in opts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_input_dtypes(backend):
    """bf16 logprobs with fp32 old_logprobs (compiled as is) and fp16 advantages (converted to fp32)."""
    lp, old, adv, mask = make_inputs((3, 20))
    lp = lp.bfloat16()
    adv = adv.half()
    want, want_grad, _, _ = loop_policy(lp, old, adv, mask, dual_clip=2.0)
    loss, grad, _ = run(backend, lp, old, adv, mask, dual_clip=2.0)
    assert grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_log_ratio_clamp(backend, sign):
    """|lp - old| > 20: the ratio is exp(+-20) and the gradient 0 (the clamp), never inf/NaN;
    approx_kl uses the clamped log-ratio."""
    lp = torch.tensor([[0.0, 0.0, -1.0, -2.0]])
    old = torch.tensor([[-25.0 * sign, -30.0 * sign, -1.1, -2.0]])
    adv = torch.tensor([[-1e-9, 1e-9, 1.0, -0.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    want, want_grad, want_stats, _ = loop_policy(lp, old, adv, mask)
    loss, grad, stats = run(backend, lp, old, adv, mask)
    assert torch.isfinite(grad).all() and grad[0, 0] == 0 and grad[0, 1] == 0 and grad[0, 2] != 0
    assert loss.item() == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=1e-5)
    for k in STATS:
        assert stats[k].item() == pytest.approx(want_stats[k], rel=1e-6), k
    extreme = stats["ratio_max"] if sign > 0 else stats["ratio_min"]
    assert extreme.item() == pytest.approx(math.exp(20 * sign), rel=1e-6)


# ----------------------------------------------------------------------------- masking edge cases
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch(backend, agg):
    lp, old, adv, mask = make_inputs((2, 6), mask_kind="none")
    lp[0, 0], old[1, 2], adv[0, 3] = math.nan, math.inf, -math.inf
    want = {"clip_frac": 0.0, "clip_frac_lower": 0.0, "approx_kl": 0.0, "ratio_max": 1.0, "ratio_min": 1.0}
    check_all_masked(fastppo.policy_loss, backend, (lp, old, adv), mask, want, agg=agg)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_masked_positions_does_not_leak(backend):
    lp, old, adv, mask = make_inputs((3, 10), mask_kind="row")
    check_masked_garbage_does_not_leak(
        fastppo.policy_loss, backend, (lp, old, adv), mask, dual_clip=2.0, agg="seq-mean-token-mean"
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_inputs(backend):
    """logprobs without requires_grad: the kernel skips the gradient store; same loss and stats."""
    lp, old, adv, mask = make_inputs((2, 13))
    with fastppo.use_backend(backend):
        loss, stats = fastppo.policy_loss(*to_kernel_device(lp, old, adv, mask, backend=backend))
    want, _, want_stats, _ = loop_policy(lp, old, adv, mask)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(want_stats["clip_frac"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_output_scales(backend):
    lp, old, adv, mask = make_inputs((2, 9))
    _, g1, _ = run(backend, lp, old, adv, mask)
    x, old, adv, mask = to_kernel_device(lp.detach(), old, adv, mask, backend=backend)
    x.requires_grad_()
    with fastppo.use_backend(backend):
        (3.0 * fastppo.policy_loss(x, old, adv, mask)[0]).backward()
    torch.testing.assert_close(x.grad.cpu(), 3.0 * g1)


# ----------------------------------------------------------------------------- normalizer / accumulation
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_gradient_accumulation_equals_full_batch(backend, agg):
    """Micro-batches with normalizer = the global count give, summed, the full-batch loss and gradient.

    token-mean: the global number of valid tokens. seq-mean-token-sum: the global number of valid
    sequences. seq-mean-token-mean: likewise (each sequence's own mean is local to its micro-batch).
    """
    lp, old, adv, mask = make_inputs((6, 13), mask_kind="row")
    splits = (slice(0, 2), slice(2, 3), slice(3, 6))
    check_gradient_accumulation(
        fastppo.policy_loss, backend, (lp, old, adv), mask, splits, agg=agg, tensor_normalizer=True
    )


# ----------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 3),
    T=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    agg=st.sampled_from(AGGS),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_property_ratio_one_is_minus_mean_advantage(rows, T, seed, agg, backend):
    """lp == old: ratio 1, nothing clipped, loss = -aggregated A, approx_kl 0, gradient = -w A."""
    _, _, adv, mask = make_inputs((rows, T), seed=seed)
    lp = -torch.rand(rows, T)
    loss, grad, stats = run(backend, lp, lp.clone(), adv, mask, agg=agg, dual_clip=2.0)
    want, want_grad, _, _ = loop_policy(lp, lp, adv, mask, agg=agg)
    if agg == "token-mean":
        assert want == pytest.approx(-adv[mask].double().sum().item() / max(int(mask.sum()), 1), abs=1e-12)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=1e-5)
    assert stats["clip_frac"].item() == 0.0 and stats["clip_frac_lower"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_max"].item() == 1.0 and stats["ratio_min"].item() == 1.0


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    spread=st.floats(0.0, 3.0),
    dual_clip=st.sampled_from([None, 1.2, 3.0]),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_property_stats_in_range(shape, seed, spread, dual_clip, backend):
    lp, old, adv, mask = make_inputs(shape, seed=seed, spread=spread)
    loss, grad, stats = run(backend, lp, old, adv, mask, dual_clip=dual_clip)
    s = {k: v.item() for k, v in stats.items()}
    assert 0.0 <= s["clip_frac"] <= 1.0 and 0.0 <= s["clip_frac_lower"] <= 1.0
    assert s["approx_kl"] >= -1e-6  # k3 >= 0
    assert 0.0 < s["ratio_min"] <= s["ratio_max"]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want, _, want_stats, scale = loop_policy(lp, old, adv, mask, dual_clip=dual_clip)
    assert loss.item() == pytest.approx(want, abs=1e-6 * (1 + scale))
    assert s["clip_frac"] == pytest.approx(want_stats["clip_frac"], abs=1e-6)


# ----------------------------------------------------------------------------- bad input
def _good():
    lp, old, adv, mask = make_inputs((2, 4))
    return {"logprobs": lp, "old_logprobs": old, "advantages": adv, "mask": mask}


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"old_logprobs": torch.zeros(2, 5)}, ValueError, "old_logprobs must have shape"),
        ({"advantages": torch.zeros(4, 2)}, ValueError, "advantages must have shape"),
        ({"mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"logprobs": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "logprobs must be a floating-point"),
        ({"advantages": torch.zeros(2, 4, dtype=torch.int32)}, TypeError, "advantages must be a floating-point"),
        ({"mask": torch.ones(2, 4)}, TypeError, "mask must be a bool or integer"),
        ({"logprobs": [[0.0] * 4] * 2}, TypeError, "logprobs must be a torch.Tensor"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool, device="meta")}, ValueError, "mask is on meta"),
        (
            {
                "logprobs": torch.tensor(0.0),
                "old_logprobs": torch.tensor(0.0),
                "advantages": torch.tensor(0.0),
                "mask": torch.tensor(True),
            },
            ValueError,
            "logprobs must have shape \\[..., T\\]",
        ),
        ({"clip_low": 0.0}, ValueError, "clip_low must be in"),
        ({"clip_low": 1.0}, ValueError, "clip_low must be in"),
        ({"clip_low": math.nan}, ValueError, "clip_low must be in"),
        ({"clip_low": "0.2"}, TypeError, "clip_low must be a number"),
        ({"clip_high": 0.0}, ValueError, "clip_high must be > 0"),
        ({"clip_high": -0.2}, ValueError, "clip_high must be > 0"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip must be > 1"),
        ({"dual_clip": 0.5}, ValueError, "dual_clip must be > 1"),
        ({"dual_clip": True}, TypeError, "dual_clip must be a number"),
        ({"agg": "mean"}, ValueError, "agg must be one of"),
        ({"normalizer": 0}, ValueError, "normalizer must be > 0"),
        ({"normalizer": -3.0}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.tensor(0.0)}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.tensor([4.0])}, ValueError, "normalizer must be a number or a 0-dim tensor"),
        ({"normalizer": torch.tensor(True)}, TypeError, "normalizer must be a real number"),
        ({"normalizer": "8"}, TypeError, "normalizer must be a number"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(change, exc, match, backend):
    check_bad_input(fastppo.policy_loss, _good(), change, exc, match, backend)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mixed_cpu_cuda_inputs(backend):
    """A CPU mask with CUDA inputs is a ValueError naming the mask, on every backend."""
    lp, old, adv, mask = make_inputs((2, 4))
    with fastppo.use_backend(backend), pytest.raises(ValueError, match="mask is on cpu but logprobs is on cuda"):
        fastppo.policy_loss(lp.cuda(), old.cuda(), adv.cuda(), mask)


def test_options_are_keyword_only():
    args = _good()
    with pytest.raises(TypeError):
        fastppo.policy_loss(*args.values(), 0.2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_constants_get_no_gradient(backend):
    lp, old, adv, mask = to_kernel_device(*make_inputs((2, 7)), backend=backend)
    lp, old, adv = (x.requires_grad_() for x in (lp, old, adv))
    with fastppo.use_backend(backend):
        fastppo.policy_loss(lp, old, adv, mask, dual_clip=2.0)[0].backward()
    assert lp.grad is not None and old.grad is None and adv.grad is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_input(backend, shape):
    lp, old, adv, mask = to_kernel_device(
        torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), torch.ones(shape, dtype=torch.bool), backend=backend
    )
    lp.requires_grad_()
    with fastppo.use_backend(backend):
        loss, stats = fastppo.policy_loss(lp, old, adv, mask)
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.shape == shape
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_max"].item() == 1.0
