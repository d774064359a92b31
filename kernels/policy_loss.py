"""PPO clipped policy loss in one Triton pass: per-token loss, its gradient and the stats.

Flow: ``_policy_loss_fwd_kernel`` -> ``policy_loss_fwd`` (launcher) -> ``PolicyLossFunction`` (its backward:
:class:`fastppo.kernels._loss.WeightedLossFunction`) -> ``policy_loss_triton`` (called by
:func:`fastppo.policy_loss` after validation).

Per token (float32), with ``A`` the advantage and ``m`` the mask::

    ratio = exp(clamp(lp - old, -20, 20))
    l1 = -A ratio,  l2 = -A clamp(ratio, 1 - clip_low, 1 + clip_high),  l = max(l1, l2)
    dual clip (A < 0): l = min(l, -A c)
    dl/dlp = l1 on the unclipped branch (d ratio / d lp = ratio), 0 where a clip or the clamp is active.

Aggregation (the row weights of ``agg``/``normalizer``, applied after the pass) as described in
:mod:`fastppo.kernels._loss`: the kernel writes the unweighted gradient and per-program partial sums.
"""

from __future__ import annotations

import dataclasses

import torch
import triton.language as tl

from fastppo.kernels._jit import jit
from fastppo.kernels._loss import (
    WeightedLossFunction,
    kernel_inputs,
    launch_loss_kernel,
    loss_kernel_specs,
    reduce_partials,
)
from fastppo.kernels._streaming import flag, load_valid, row_block

STAT_NAMES = ("clip_frac", "clip_frac_lower", "approx_kl", "ratio_max", "ratio_min")


@jit
def _policy_loss_fwd_kernel(
    LP,
    OLD,
    ADV,
    MASK,
    GRAD,
    PART,
    T,
    n_tblocks,
    s_lp_r,
    s_lp_t,
    s_old_r,
    s_old_t,
    s_adv_r,
    s_adv_t,
    s_m_r,
    s_m_t,
    ratio_low,
    ratio_high,
    dual_clip,
    store_grad,
    BLOCK: tl.constexpr,
):
    """One program: row ``program_id(0)``, tokens ``[program_id(1) * BLOCK, +BLOCK)``.

    LP/OLD/ADV: [rows, T] any strides (fp32/bf16/fp16), MASK: [rows, T] bool, GRAD: [rows, T] fp32
    contiguous (written when ``store_grad``), PART: [rows, n_tblocks, 8] fp32 (valid count, loss sum,
    clip count, dual-clip count, k3 sum, ratio max, ratio min). ``dual_clip`` is 0 when dual clipping
    is off (a valid one is > 1).
    """
    row, tb, c, in_row = row_block(T, BLOCK)
    valid = tl.load(MASK + row * s_m_r + c * s_m_t, mask=in_row, other=0) != 0
    lp = load_valid(LP, row, c, s_lp_r, s_lp_t, in_row, valid)
    old = load_valid(OLD, row, c, s_old_r, s_old_t, in_row, valid)
    adv = load_valid(ADV, row, c, s_adv_r, s_adv_t, in_row, valid)

    d = lp - old
    log_ratio = tl.minimum(tl.maximum(d, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    clipped = loss2 > loss1
    loss = tl.maximum(loss1, loss2)
    loss3 = -adv * dual_clip
    use_dual = tl.full((BLOCK,), dual_clip, tl.float32) > 0.0
    lower = use_dual & (adv < 0.0) & (loss3 < loss)
    loss = tl.where(lower, loss3, loss)
    loss = tl.where(valid, loss, 0.0)

    live = valid & (d >= -20.0) & (d <= 20.0)
    grad = tl.where(clipped | lower, 0.0, loss1)
    grad = tl.where(live, grad, 0.0)
    tl.store(GRAD + row * T + c, grad, mask=in_row & flag(store_grad, BLOCK))

    validf = valid.to(tl.float32)
    base = PART + (row * n_tblocks + tb) * 8
    tl.store(base + 0, tl.sum(validf, axis=0))
    tl.store(base + 1, tl.sum(loss, axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & clipped, 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid & lower, 1.0, 0.0), axis=0))
    tl.store(base + 4, tl.sum(tl.where(valid, (ratio - 1.0) - log_ratio, 0.0), axis=0))
    tl.store(base + 5, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))
    tl.store(base + 6, tl.min(tl.where(valid, ratio, float("inf")), axis=0))


def policy_loss_fwd(logprobs, old_logprobs, advantages, mask, *, ratio_low, ratio_high, dual_clip, store_grad):
    """Launch the kernel on ``[..., T]`` inputs (:func:`fastppo.kernels._loss.launch_loss_kernel`).

    Returns ``(grad [rows, T] fp32 or None, partials [rows, blocks, 8] fp32)``.
    """
    scalars = (float(ratio_low), float(ratio_high), float(dual_clip))
    return launch_loss_kernel(_policy_loss_fwd_kernel, (logprobs, old_logprobs, advantages), mask, scalars, store_grad)


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    clip_low: float
    clip_high: float
    dual_clip: float | None
    agg: str
    normalizer: object  # None, a number or a 0-dim tensor


class PolicyLossFunction(WeightedLossFunction):
    """``(logprobs, old_logprobs, advantages, mask, cfg) -> (loss fp32 0-dim, stats fp32 [5])``; grad to logprobs."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, cfg: PolicyLossConfig):
        store_grad = ctx.needs_input_grad[0]
        grad, part = policy_loss_fwd(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            ratio_low=1.0 - cfg.clip_low,
            ratio_high=1.0 + cfg.clip_high,
            dual_clip=0.0 if cfg.dual_clip is None else cfg.dual_clip,
            store_grad=store_grad,
        )
        loss, w, p, total = reduce_partials(part, cfg.agg, cfg.normalizer)
        n = total[0]
        frac = total[2:5] / n.clamp_min(1.0)  # clip_frac, clip_frac_lower, approx_kl
        one = torch.ones((), dtype=torch.float64, device=p.device)
        rmax = torch.where(n > 0, p[..., 5].amax(), one)
        rmin = torch.where(n > 0, p[..., 6].amin(), one)
        stats = torch.cat([frac, rmax[None], rmin[None]]).to(torch.float32)
        return WeightedLossFunction.finish(ctx, logprobs, grad, w, loss, stats)


def policy_loss_triton(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip, agg, normalizer):
    """Kernel path of :func:`fastppo.policy_loss` (inputs already validated, ``mask`` bool, no float64).

    ``old_logprobs``/``advantages`` keep their dtype when it is ``logprobs``' dtype or float32 (the
    compiled combinations); anything else is converted to float32 first (a copy).
    """
    old_logprobs, advantages = kernel_inputs(logprobs, old_logprobs, advantages)
    cfg = PolicyLossConfig(clip_low, clip_low if clip_high is None else clip_high, dual_clip, agg, normalizer)
    loss, stats = PolicyLossFunction.apply(logprobs, old_logprobs, advantages, mask, cfg)
    return loss, dict(zip(STAT_NAMES, stats.unbind()))


# Every (dtype combination, block size) the launcher can pick: logprobs fp32/bf16/fp16, the two
# constant inputs either in logprobs' dtype or fp32; one block size. compile_check compiles these.
COMPILE_SPECS = loss_kernel_specs(
    _policy_loss_fwd_kernel,
    ("LP", "OLD", "ADV"),
    {"ratio_low": "fp32", "ratio_high": "fp32", "dual_clip": "fp32"},
)
