"""PPO (clipped) value loss in one Triton pass: per-token loss, its gradient and the stats.

Flow: ``_value_loss_fwd_kernel`` -> ``value_loss_fwd`` (launcher) -> ``ValueLossFunction`` ->
``value_loss_triton`` (called by :func:`fastppo.value_loss` after validation).

Per token (float32), ``v`` values, ``o`` old values, ``R`` returns::

    e1 = (v - R)^2,  e2 = (clamp(v, o - c, o + c) - R)^2      (e2 only with clip = c)
    l = 0.5 max(e1, e2)
    dl/dv = v - R when e1 wins, (clamp(v, o - c, o + c) - R) * [o - c <= v <= o + c] when e2 wins.

Aggregation as in :mod:`fastppo.kernels.policy_loss`: the kernel writes the unweighted gradient and
per-program partial sums; torch turns the row counts into per-row weights (batch-wide counts are only
known after the pass) and the backward is ``saved_grad * (grad_output * w_row)``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastppo.kernels._jit import jit, on_device
from fastppo.kernels.policy_loss import (
    BLOCK_T,
    N_PARTIAL,
    NUM_WARPS,
    loss_kernel_specs,
    reduce_partials,
    weighted_grad,
)

# Block size and warps as the policy loss (same access pattern: three streams + a mask).
STAT_NAMES = ("clip_frac", "vpred_mean", "error_mean")


@jit
def _value_loss_fwd_kernel(
    V,
    OLD,
    RET,
    MASK,
    GRAD,
    PART,
    T,
    n_tblocks,
    s_v_r,
    s_v_t,
    s_old_r,
    s_old_t,
    s_ret_r,
    s_ret_t,
    s_m_r,
    s_m_t,
    clip,
    has_clip,
    store_grad,
    BLOCK: tl.constexpr,
):
    """One program: row ``program_id(0)``, tokens ``[program_id(1) * BLOCK, +BLOCK)``.

    V/OLD/RET: [rows, T] any strides, MASK: [rows, T] bool, GRAD: [rows, T] fp32 contiguous
    (written when ``store_grad``), PART: [rows, n_tblocks, 8] fp32 (count, loss sum, clip count,
    v sum, (v - R)^2 sum). OLD is not read when ``has_clip == 0``.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can exceed 2**31
    tb = tl.program_id(1)
    cols = tb * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < T
    c = cols.to(tl.int64)
    valid = tl.load(MASK + row * s_m_r + c * s_m_t, mask=in_row, other=0) != 0
    use_clip = tl.full((BLOCK,), has_clip, tl.int32) != 0  # a tensor: the interpreter needs one in a mask
    # Loads masked by the row bound only (a mask that depends on data cannot be vectorised), then
    # masked positions replaced by 0: a NaN/inf stored there cannot leak.
    v = tl.where(valid, tl.load(V + row * s_v_r + c * s_v_t, mask=in_row, other=0.0).to(tl.float32), 0.0)
    ret = tl.where(valid, tl.load(RET + row * s_ret_r + c * s_ret_t, mask=in_row, other=0.0).to(tl.float32), 0.0)
    old = tl.load(OLD + row * s_old_r + c * s_old_t, mask=in_row & use_clip, other=0.0).to(tl.float32)
    old = tl.where(valid & use_clip, old, 0.0)

    diff = v - ret
    err = diff * diff
    # v clamped to [old - c, old + c], not old + clamp(v - old, -c, c): the latter is not exactly v in
    # float32 when nothing is clipped, and a rounding-only larger error would count as clipped.
    lo = old - clip
    hi = old + clip
    diff_c = tl.minimum(tl.maximum(v, lo), hi) - ret
    err_c = diff_c * diff_c
    clipped = use_clip & (err_c > err)
    loss = tl.where(valid, 0.5 * tl.where(clipped, err_c, err), 0.0)
    inside = (v >= lo) & (v <= hi)
    grad = tl.where(clipped, tl.where(inside, diff_c, 0.0), diff)
    grad = tl.where(valid, grad, 0.0)
    tl.store(GRAD + row * T + c, grad, mask=in_row & (tl.full((BLOCK,), store_grad, tl.int32) != 0))

    base = PART + (row * n_tblocks + tb) * 8
    tl.store(base + 0, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(base + 1, tl.sum(loss, axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & clipped, 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(v, axis=0))  # v is 0 at masked positions
    tl.store(base + 4, tl.sum(tl.where(valid, err, 0.0), axis=0))


def value_loss_fwd(values, old_values, returns, mask, *, clip, store_grad):
    """Launch the kernel on ``[..., T]`` inputs.

    Returns ``(grad [rows, T] fp32 or None, partials [rows, blocks, 8] fp32)``.

    ``reshape(-1, T)`` is a view (no copy) for any 2-D strides and mergeable leading dims.
    """
    T = values.shape[-1]
    v, old, ret, m = (x.reshape(-1, T) for x in (values, old_values, returns, mask))
    rows = v.shape[0]
    n_tblocks = triton.cdiv(T, BLOCK_T)
    grad = torch.empty((rows, T) if store_grad else (1,), dtype=torch.float32, device=v.device)
    part = torch.empty((rows, n_tblocks, N_PARTIAL), dtype=torch.float32, device=v.device)
    with on_device(v):
        _value_loss_fwd_kernel[(rows, n_tblocks)](
            v,
            old,
            ret,
            m,
            grad,
            part,
            T,
            n_tblocks,
            v.stride(0),
            v.stride(1),
            old.stride(0),
            old.stride(1),
            ret.stride(0),
            ret.stride(1),
            m.stride(0),
            m.stride(1),
            0.0 if clip is None else float(clip),
            int(clip is not None),
            int(store_grad),
            BLOCK=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return (grad if store_grad else None), part


@dataclasses.dataclass(frozen=True)
class ValueLossConfig:
    clip: float | None
    agg: str
    normalizer: object  # None, a number or a 0-dim tensor


class ValueLossFunction(torch.autograd.Function):
    """``(values, old_values, returns, mask, cfg) -> (loss fp32 0-dim, stats fp32 [3])``; grad to values only."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, cfg: ValueLossConfig):
        store_grad = ctx.needs_input_grad[0]
        grad, part = value_loss_fwd(values, old_values, returns, mask, clip=cfg.clip, store_grad=store_grad)
        loss, w, _, total = reduce_partials(part, cfg.agg, cfg.normalizer)
        stats = (total[2:5] / total[0].clamp_min(1.0)).to(torch.float32)  # clip_frac, vpred_mean, error_mean
        ctx.mark_non_differentiable(stats)
        if store_grad:
            ctx.save_for_backward(grad, w)
        ctx.v_shape, ctx.v_dtype = values.shape, values.dtype
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises instead of going wrong
    def backward(ctx, grad_loss, grad_stats):
        grad, w = ctx.saved_tensors
        return weighted_grad(grad, w, grad_loss, ctx.v_shape, ctx.v_dtype), None, None, None, None


def value_loss_triton(values, old_values, returns, mask, *, clip, agg, normalizer):
    """Kernel path of :func:`fastppo.value_loss` (inputs validated, ``mask`` bool, no float64).

    ``old_values``/``returns`` keep their dtype when it is ``values``' dtype or float32 (the compiled
    combinations); anything else is converted to float32 first (a copy).
    """
    keep = (values.dtype, torch.float32)
    old_values = old_values.detach()
    returns = returns.detach()
    if old_values.dtype not in keep:
        old_values = old_values.float()
    if returns.dtype not in keep:
        returns = returns.float()
    loss, stats = ValueLossFunction.apply(values, old_values, returns, mask, ValueLossConfig(clip, agg, normalizer))
    return loss, dict(zip(STAT_NAMES, stats.unbind()))


# values fp32/bf16/fp16; old_values/returns in values' dtype or fp32; one block size.
COMPILE_SPECS = loss_kernel_specs(
    _value_loss_fwd_kernel, ("V", "OLD", "RET"), {"clip": "fp32", "has_clip": "i32", "store_grad": "i32"}
)
