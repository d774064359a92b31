"""PyTorch reference of the PPO losses: clipped policy loss, clipped value loss, KL penalties.

Plain vectorized torch, differentiable by autograd. It is the CPU path of :mod:`fastppo.losses`, the
ground truth the Triton kernels are tested against (together with a float64 loop in the tests) and a
benchmark baseline. Inputs are assumed validated by :mod:`fastppo.losses` (shapes equal, ``mask`` bool).

Compute dtype: float32, or float64 when an input is float64 (``result_dtype``). Every input is first
passed through ``torch.where(mask, x, 0)``: a NaN/inf in a masked position then never reaches the loss,
the stats or (through the backward of the arithmetic) the gradient.
"""

from __future__ import annotations

import torch

from fastppo.reference.common import result_dtype

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_KINDS = ("k1", "abs", "k2", "k3")

# verl/OpenRLHF clamp the log-ratio before exp (exp(20) ~ 4.9e8 is finite in float16's float32 compute)
# and the k3 estimator to [-10, 10]; k3 >= 0, so only the upper clamp binds (the lower bound here is 0,
# a rounding guard).
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def _clean(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with masked positions replaced by 0."""
    return torch.where(mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None) -> torch.Tensor:
    """Reduce a ``[..., T]`` per-token loss to a scalar (masked positions must already be 0).

    * ``"token-mean"``: sum over valid tokens / (number of valid tokens, or ``normalizer``);
    * ``"seq-mean-token-sum"``: per sequence (a row over the last dim) the sum over its valid tokens,
      then the mean over sequences with at least one valid token (or the sum / ``normalizer``);
    * ``"seq-mean-token-mean"``: per sequence the mean over its valid tokens, then the same mean over sequences.

    A denominator with nothing to count is 1, so an all-masked batch gives 0.
    """
    dtype = per_token.dtype
    if agg == "token-mean":
        den = mask.sum().clamp_min(1).to(dtype) if normalizer is None else _as_scalar(normalizer, per_token)
        return per_token.sum() / den
    row = per_token.sum(-1)
    count = mask.sum(-1)
    if agg == "seq-mean-token-mean":
        row = row / count.clamp_min(1).to(dtype)
    den = (count > 0).sum().clamp_min(1).to(dtype) if normalizer is None else _as_scalar(normalizer, per_token)
    return row.sum() / den


def _as_scalar(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), device=like.device, dtype=like.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask, x, 0.0).sum() / count).detach().float()


def _masked_extreme(x: torch.Tensor, mask: torch.Tensor, reduce, fill: float) -> torch.Tensor:
    """max/min of ``x`` over valid positions as float32; 1.0 when none is valid (no host sync)."""
    if mask.numel() == 0:
        return torch.ones((), device=x.device)
    ext = reduce(torch.where(mask, x, fill))
    return torch.where(mask.any(), ext, torch.ones_like(ext)).float()


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    normalizer=None,
):
    """PPO clipped surrogate. ``[..., T]`` inputs, ``mask`` bool. Returns ``(loss, stats)``.

    ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))``,
    ``l = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))``, and with ``dual_clip = c``
    for ``A < 0``: ``l = min(l, -A c)``; then ``aggregate(l, mask, agg, normalizer)``.
    Gradient flows to ``logprobs`` only.
    """
    clip_high = clip_low if clip_high is None else clip_high
    dtype = result_dtype(logprobs, old_logprobs, advantages)
    lp = _clean(logprobs, mask, dtype)
    olp = _clean(old_logprobs.detach(), mask, dtype)
    adv = _clean(advantages.detach(), mask, dtype)

    log_ratio = torch.clamp(lp - olp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        lower = (adv < 0) & (loss3 < per_token)
        per_token = torch.where(adv < 0, torch.minimum(per_token, loss3), per_token)
    else:
        lower = torch.zeros_like(clipped)
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=dtype, device=lp.device))
    loss = aggregate(per_token, mask, agg, normalizer)

    with torch.no_grad():
        count = mask.sum().clamp_min(1).to(dtype)
        r = ratio.detach()
        stats = {
            "clip_frac": _masked_mean(clipped.to(dtype), mask, count),
            "clip_frac_lower": _masked_mean(lower.to(dtype), mask, count),
            "approx_kl": _masked_mean((r - 1.0) - log_ratio.detach(), mask, count),
            "ratio_max": _masked_extreme(r, mask, torch.amax, -torch.inf),
            "ratio_min": _masked_extreme(r, mask, torch.amin, torch.inf),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, *, clip=None, agg="token-mean", normalizer=None):
    """PPO value loss. ``[..., T]`` inputs, ``mask`` bool. Returns ``(loss, stats)``.

    ``l = 0.5 (v - R)^2``, or with ``clip = c``:
    ``l = 0.5 max((v - R)^2, (clamp(v, old - c, old + c) - R)^2)``; then ``aggregate(l, mask, agg, normalizer)``.
    Gradient flows to ``values`` only.
    """
    dtype = result_dtype(values, old_values, returns)
    v = _clean(values, mask, dtype)
    ret = _clean(returns.detach(), mask, dtype)
    err = (v - ret) ** 2
    if clip is not None:
        old = _clean(old_values.detach(), mask, dtype)
        # clamp v itself (as verl/TRL): old + clamp(v - old, -c, c) is not exactly v in float32 when
        # nothing is clipped, and a larger error by rounding alone would count in clip_frac
        v_clipped = torch.clamp(v, old - clip, old + clip)
        err_clipped = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
        clipped = err_clipped > err
    else:
        per_token = 0.5 * err
        clipped = torch.zeros_like(mask)
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=dtype, device=v.device))
    loss = aggregate(per_token, mask, agg, normalizer)

    with torch.no_grad():
        count = mask.sum().clamp_min(1).to(dtype)
        stats = {
            "clip_frac": _masked_mean(clipped.to(dtype), mask, count),
            "vpred_mean": _masked_mean(v.detach(), mask, count),
            "error_mean": _masked_mean(err.detach(), mask, count),
        }
    return loss, stats


def kl_penalty(logprobs, ref_logprobs, *, kind="k1", mask=None):
    """Per-token KL estimate of ``logprobs`` against ``ref_logprobs`` (same shape, any shape).

    ``d = logprobs - ref_logprobs``: ``k1 = d``, ``abs = |d|``, ``k2 = d^2 / 2``,
    ``k3 = clamp(exp(-dc) + dc - 1, 0, 10)`` with ``dc = clamp(d, -20, 20)``. k3 is >= 0
    mathematically; the floor at 0 only guards against rounding (``expm1`` keeps it small) and lets
    the gradient pass, while the clamp at 10 (as verl/OpenRLHF) stops it.
    Differentiable with respect to both inputs; masked positions give 0 and zero gradient.
    """
    dtype = result_dtype(logprobs, ref_logprobs)
    if mask is None:
        d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    else:
        d = _clean(logprobs, mask, dtype) - _clean(ref_logprobs, mask, dtype)
    if kind == "k1":
        out = d
    elif kind == "abs":
        out = d.abs()
    elif kind == "k2":
        out = 0.5 * d * d
    elif kind == "k3":
        dc = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        # expm1(-d) + d cancels: at |d| ~ 1e-4 a float32 result keeps ~3 significant digits. In float64
        # the same formula keeps ~12 at any d a float32 can hold: compute there, round once.
        dc64 = dc.double()
        out = torch.clamp(torch.expm1(-dc64) + dc64, max=K3_CLAMP).to(dtype)
        out = out + (out.clamp_min(0.0) - out).detach()  # rounding guard: value floored, gradient unchanged
    else:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if mask is not None:
        out = torch.where(mask, out, torch.zeros((), dtype=dtype, device=out.device))
    return out
