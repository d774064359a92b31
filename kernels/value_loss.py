"""PPO (clipped) value loss in one Triton pass: per-token loss, its gradient and the stats.

Flow: ``_value_loss_fwd_kernel`` -> ``value_loss_fwd`` (launcher) -> ``ValueLossFunction`` (its backward:
:class:`fastppo.kernels._loss.WeightedLossFunction`) -> ``value_loss_triton`` (called by
:func:`fastppo.value_loss` after validation).

Per token (float32), ``v`` values, ``o`` old values, ``R`` returns::

    e1 = (v - R)^2,  e2 = (clamp(v, o - c, o + c) - R)^2      (e2 only with clip = c)
    l = 0.5 max(e1, e2)
    dl/dv = v - R when e1 wins, (clamp(v, o - c, o + c) - R) * [o - c <= v <= o + c] when e2 wins.

Aggregation as in :mod:`fastppo.kernels._loss`: the kernel writes the unweighted gradient and
per-program partial sums; torch turns the row counts into per-row weights (batch-wide counts are only
known after the pass) and the backward is ``saved_grad * (grad_output * w_row)``.
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
    row, tb, c, in_row = row_block(T, BLOCK)
    valid = tl.load(MASK + row * s_m_r + c * s_m_t, mask=in_row, other=0) != 0
    use_clip = flag(has_clip, BLOCK)
    v = load_valid(V, row, c, s_v_r, s_v_t, in_row, valid)
    ret = load_valid(RET, row, c, s_ret_r, s_ret_t, in_row, valid)
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
    tl.store(GRAD + row * T + c, grad, mask=in_row & flag(store_grad, BLOCK))

    base = PART + (row * n_tblocks + tb) * 8
    tl.store(base + 0, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(base + 1, tl.sum(loss, axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & clipped, 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(v, axis=0))  # v is 0 at masked positions
    tl.store(base + 4, tl.sum(tl.where(valid, err, 0.0), axis=0))


def value_loss_fwd(values, old_values, returns, mask, *, clip, store_grad):
    """Launch the kernel on ``[..., T]`` inputs (:func:`fastppo.kernels._loss.launch_loss_kernel`).

    Returns ``(grad [rows, T] fp32 or None, partials [rows, blocks, 8] fp32)``.
    """
    scalars = (0.0 if clip is None else float(clip), int(clip is not None))
    return launch_loss_kernel(_value_loss_fwd_kernel, (values, old_values, returns), mask, scalars, store_grad)


@dataclasses.dataclass(frozen=True)
class ValueLossConfig:
    clip: float | None
    agg: str
    normalizer: object  # None, a number or a 0-dim tensor


class ValueLossFunction(WeightedLossFunction):
    """``(values, old_values, returns, mask, cfg) -> (loss fp32 0-dim, stats fp32 [3])``; grad to values only."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, cfg: ValueLossConfig):
        store_grad = ctx.needs_input_grad[0]
        grad, part = value_loss_fwd(values, old_values, returns, mask, clip=cfg.clip, store_grad=store_grad)
        loss, w, _, total = reduce_partials(part, cfg.agg, cfg.normalizer)
        stats = (total[2:5] / total[0].clamp_min(1.0)).to(torch.float32)  # clip_frac, vpred_mean, error_mean
        return WeightedLossFunction.finish(ctx, values, grad, w, loss, stats)


def value_loss_triton(values, old_values, returns, mask, *, clip, agg, normalizer):
    """Kernel path of :func:`fastppo.value_loss` (inputs validated, ``mask`` bool, no float64).

    ``old_values``/``returns`` keep their dtype when it is ``values``' dtype or float32 (the compiled
    combinations); anything else is converted to float32 first (a copy).
    """
    old_values, returns = kernel_inputs(values, old_values, returns)
    loss, stats = ValueLossFunction.apply(values, old_values, returns, mask, ValueLossConfig(clip, agg, normalizer))
    return loss, dict(zip(STAT_NAMES, stats.unbind()))


# values fp32/bf16/fp16; old_values/returns in values' dtype or fp32; one block size.
COMPILE_SPECS = loss_kernel_specs(_value_loss_fwd_kernel, ("V", "OLD", "RET"), {"clip": "fp32", "has_clip": "i32"})
