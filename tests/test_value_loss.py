"""fastppo.value_loss: reference and Triton kernel against a plain float64 loop.

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
from tests._tol import requires_cuda

STATS = ("clip_frac", "vpred_mean", "error_mean")


def loop_value(v, old, ret, mask, *, clip=None, agg="token-mean", normalizer=None):
    """Plain float64 loop: returns (loss, dloss/dv [shape of v], stats dict, sum of |weighted loss terms|)."""
    T = v.shape[-1]
    V, O, R = (x.detach().double().reshape(-1, T).tolist() for x in (v, old, ret))
    M = mask.reshape(-1, T).bool().tolist()
    rows = len(V)
    l_tok = [[0.0] * T for _ in range(rows)]
    g_tok = [[0.0] * T for _ in range(rows)]
    n = n_clip = 0
    v_sum = e_sum = 0.0
    for r in range(rows):
        for t in range(T):
            if not M[r][t]:
                continue
            diff = V[r][t] - R[r][t]
            loss, grad = 0.5 * diff * diff, diff
            if clip is not None:
                lo, hi = O[r][t] - clip, O[r][t] + clip
                diff_c = min(max(V[r][t], lo), hi) - R[r][t]
                if diff_c * diff_c > diff * diff:
                    loss = 0.5 * diff_c * diff_c
                    grad = diff_c if lo <= V[r][t] <= hi else 0.0
                    n_clip += 1
            l_tok[r][t], g_tok[r][t] = loss, grad
            n += 1
            v_sum += V[r][t]
            e_sum += diff * diff
    w = loop_weights(M, agg, normalizer)
    loss = sum(w[r] * sum(l_tok[r]) for r in range(rows))
    scale = sum(w[r] * sum(l_tok[r]) for r in range(rows))  # every term is >= 0
    grad = torch.tensor([[w[r] * g for g in g_tok[r]] for r in range(rows)], dtype=torch.float64).reshape(v.shape)
    den = max(n, 1)
    return loss, grad, {"clip_frac": n_clip / den, "vpred_mean": v_sum / den, "error_mean": e_sum / den}, scale


def make_inputs(shape, *, seed=0, mask_kind="holes"):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g)
    old = v + 0.3 * torch.randn(shape, generator=g)
    ret = torch.randn(shape, generator=g)
    return v, old, ret, random_mask(shape, g, mask_kind)


def run(backend, v, old, ret, mask, **opts):
    """fastppo.value_loss on ``backend``: (loss, d loss / d v, stats) on the CPU."""
    return run_loss(fastppo.value_loss, backend, v, old, ret, mask, **opts)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_loop(agg, clip, dtype):
    v, old, ret, mask = (x.to(dtype) if x.is_floating_point() else x for x in make_inputs((2, 3, 9), mask_kind="row"))
    loss, grad, stats = run("torch", v, old, ret, mask, clip=clip, agg=agg)
    want, want_grad, want_stats, _ = loop_value(v, old, ret, mask, clip=clip, agg=agg)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.item() == pytest.approx(want, abs=tol, rel=tol)
    torch.testing.assert_close(grad.double(), want_grad, atol=tol, rtol=tol)
    for k in STATS:
        assert stats[k].dtype == torch.float32 and stats[k].shape == () and not stats[k].requires_grad
        assert stats[k].item() == pytest.approx(want_stats[k], abs=2e-6), k
    assert (want_stats["clip_frac"] > 0) == (clip is not None)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_reference_gradcheck(agg, clip):
    v, old, ret, mask = (x.double() if x.is_floating_point() else x for x in make_inputs((3, 5), mask_kind="row"))
    v.requires_grad_()
    fn = lambda x: fastppo.reference.losses.value_loss(x, old, ret, mask, clip=clip, agg=agg)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-8)


CASES = {
    # name: (shape, layout, mask kind, int mask, options)
    "2d_clip": ((3, 37), "contiguous", "holes", False, {"clip": 0.2}),
    "3d_seqsum": ((2, 3, 5), "contiguous", "row", False, {"agg": "seq-mean-token-sum"}),
    "1x1": ((1, 1), "contiguous", "all", False, {"agg": "seq-mean-token-mean", "clip": 0.1}),
    "two_blocks_slice": ((2, 600), "slice", "row", False, {"agg": "seq-mean-token-mean", "clip": 0.2}),
    "transpose_norm": ((5, 9), "transpose", "holes", True, {"normalizer": 50.0, "clip": 0.3}),
    "permute_3d_tensor_norm": (
        (3, 2, 11),
        "permute",
        "holes",
        False,
        {"agg": "seq-mean-token-sum", "normalizer": torch.tensor(4), "clip": 0.2},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_matches_loop(case, dtype):
    shape, layout, mask_kind, int_mask, opts = CASES[case]
    v, old, ret, mask = make_inputs(shape, mask_kind=mask_kind)
    mask = mask.long() if int_mask else mask
    want_stats = check_kernel_matches_loop(
        fastppo.value_loss, loop_value, (v, old, ret), mask, layout=layout, dtype=dtype, **opts
    )
    if shape[-1] > 5:
        assert (want_stats["clip_frac"] > 0) == ("clip" in opts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_input_dtypes(backend):
    """bf16 values with fp32 returns (compiled as is) and fp16 old values (converted to fp32)."""
    v, old, ret, mask = make_inputs((3, 20))
    v, old = v.bfloat16(), old.half()
    want, want_grad, _, _ = loop_value(v, old, ret, mask, clip=0.2)
    loss, grad, _ = run(backend, v, old, ret, mask, clip=0.2)
    assert grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch(backend, agg):
    v, old, ret, mask = make_inputs((2, 6), mask_kind="none")
    v[0, 0], old[1, 2], ret[0, 3] = math.nan, math.inf, -math.inf
    want = {"clip_frac": 0.0, "vpred_mean": 0.0, "error_mean": 0.0}
    check_all_masked(fastppo.value_loss, backend, (v, old, ret), mask, want, clip=0.2, agg=agg)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clip_frac_is_zero_when_nothing_is_clipped(backend):
    """With a clip nothing reaches, no token is clipped: ``old + clamp(v - old, -c, c)`` is not exactly
    ``v`` in float32, and a clipped error larger by rounding alone would count 11.6 % of these tokens
    (verl and TRL clamp ``v`` itself and give 0)."""
    torch.manual_seed(0)
    old, v, ret = torch.randn(3, 1, 1000)
    mask = torch.ones(1, 1000, dtype=torch.bool)
    loss, stats = run(backend, v, old, ret, mask, clip=100.0)[::2]
    plain, _ = run(backend, v, old, ret, mask)[::2]
    assert stats["clip_frac"].item() == 0.0
    assert loss.item() == plain.item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_masked_positions_does_not_leak(backend):
    v, old, ret, mask = make_inputs((3, 10), mask_kind="row")
    check_masked_garbage_does_not_leak(
        fastppo.value_loss, backend, (v, old, ret), mask, clip=0.2, agg="seq-mean-token-sum"
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_old_values_unused_without_clip(backend):
    """Without ``clip`` old_values is not read: NaN there changes nothing."""
    v, old, ret, mask = make_inputs((2, 9))
    a = run(backend, v, old, ret, mask)
    b = run(backend, v, torch.full_like(old, math.nan), ret, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_gradient_accumulation_equals_full_batch(backend, agg):
    v, old, ret, mask = make_inputs((6, 13), mask_kind="row")
    splits = (slice(0, 1), slice(1, 4), slice(4, 6))
    check_gradient_accumulation(
        fastppo.value_loss, backend, (v, old, ret), mask, splits, agg=agg, tensor_normalizer=False, clip=0.2
    )


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    clip=st.sampled_from([None, 0.05, 0.5]),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_property_loss_bounds(shape, seed, clip, backend):
    """token-mean loss >= 0.5 error_mean (= it without clip); clip_frac in [0, 1]; vpred_mean is the masked mean."""
    v, old, ret, mask = make_inputs(shape, seed=seed)
    loss, grad, stats = run(backend, v, old, ret, mask, clip=clip)
    s = {k: x.item() for k, x in stats.items()}
    assert 0.0 <= s["clip_frac"] <= 1.0
    assert loss.item() >= 0.5 * s["error_mean"] - 1e-6
    if clip is None:
        assert loss.item() == pytest.approx(0.5 * s["error_mean"], rel=1e-5, abs=1e-7)
    assert s["vpred_mean"] == pytest.approx(v[mask].double().mean().item() if mask.any() else 0.0, abs=1e-6)
    assert torch.isfinite(grad).all()


def _good():
    v, old, ret, mask = make_inputs((2, 4))
    return {"values": v, "old_values": old, "returns": ret, "mask": mask}


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"old_values": torch.zeros(2, 5)}, ValueError, "old_values must have shape"),
        ({"returns": torch.zeros(2)}, ValueError, "returns must have shape"),
        ({"mask": torch.ones(4, 2, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"values": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "values must be a floating-point"),
        ({"returns": torch.zeros(2, 4, dtype=torch.bool)}, TypeError, "returns must be a floating-point"),
        ({"mask": torch.ones(2, 4, dtype=torch.float16)}, TypeError, "mask must be a bool or integer"),
        ({"returns": torch.zeros(2, 4, device="meta")}, ValueError, "returns is on meta"),
        ({"clip": 0.0}, ValueError, "clip must be > 0"),
        ({"clip": -1.0}, ValueError, "clip must be > 0"),
        ({"clip": math.inf}, ValueError, "clip must be > 0"),
        ({"clip": "0.2"}, TypeError, "clip must be a number"),
        ({"agg": "token-sum"}, ValueError, "agg must be one of"),
        ({"normalizer": 0.0}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.tensor(-1)}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.ones(2)}, ValueError, "normalizer must be a number or a 0-dim tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(change, exc, match, backend):
    check_bad_input(fastppo.value_loss, _good(), change, exc, match, backend)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mixed_cpu_cuda_inputs(backend):
    """CPU returns with CUDA values are a ValueError naming the returns, on every backend."""
    v, old, ret, mask = make_inputs((2, 4))
    with fastppo.use_backend(backend), pytest.raises(ValueError, match="returns is on cpu but values is on cuda"):
        fastppo.value_loss(v.cuda(), old.cuda(), ret, mask.cuda())
