"""PPO clipped policy loss in one Triton pass: per-token loss, its gradient and the stats.

Flow: ``_policy_loss_fwd_kernel`` -> ``policy_loss_fwd`` (launcher) -> ``PolicyLossFunction`` ->
``policy_loss_triton`` (called by :func:`fastppo.policy_loss` after validation).

Per token (float32), with ``A`` the advantage and ``m`` the mask::

    ratio = exp(clamp(lp - old, -20, 20))
    l1 = -A ratio,  l2 = -A clamp(ratio, 1 - clip_low, 1 + clip_high),  l = max(l1, l2)
    dual clip (A < 0): l = min(l, -A c)
    dl/dlp = l1 on the unclipped branch (d ratio / d lp = ratio), 0 where a clip or the clamp is active.

Aggregation weights. Every aggregation mode is ``loss = sum_rows w_row * sum_t l[row, t]``, with one
weight per row (sequence): ``1/N_tokens`` (token-mean), ``1/N_seqs`` (seq-mean-token-sum) or
``1/(n_row N_seqs)`` (seq-mean-token-mean), ``normalizer`` replacing ``N_tokens``/``N_seqs``. The
weights need batch-wide counts, known only after every token has been seen, so the kernel does not
apply them: it writes the *unweighted* gradient and, per program, the count and loss sum of its
piece of a row. Torch then sums that tiny ``[rows, blocks, 8]`` buffer (deterministically, no
atomics) into the row counts, the weights and the loss. This costs no extra pass over the
mask (computing ``mask.sum(-1)`` before the launch would), keeps one compiled kernel for all three
modes, and the backward is still one elementwise op: ``grad = saved_grad * (grad_output * w_row)``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastppo.kernels._jit import CompileSpec, jit, on_device, streaming_spec

# 512 tokens per program: 4 fp32 (16 bytes) per thread at 4 warps, so loads vectorise, and a
# [64, 1024] batch still gives 128 programs to spread over the SMs. Fixed, independent of T.
BLOCK_T = 512
NUM_WARPS = 4
# Per-program partials: valid count, loss sum, clip count, dual-clip count, k3 sum, ratio max, ratio min, pad.
N_PARTIAL = 8
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
    contiguous (written when ``store_grad``), PART: [rows, n_tblocks, 8] fp32.
    ``dual_clip`` is 0 when dual clipping is off (a valid one is > 1). Runtime flags are broadcast with
    ``tl.full`` before joining a mask (Triton's interpreter needs a tensor there).
    """
    # int64 row offsets: rows * stride can exceed 2**31 for long batches.
    row = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    cols = tb * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < T
    c = cols.to(tl.int64)
    valid = tl.load(MASK + row * s_m_r + c * s_m_t, mask=in_row, other=0) != 0
    # Loads masked by the row bound only (a mask that depends on data cannot be vectorised), then
    # masked positions replaced by 0: a NaN/inf stored there cannot leak.
    lp = tl.where(valid, tl.load(LP + row * s_lp_r + c * s_lp_t, mask=in_row, other=0.0).to(tl.float32), 0.0)
    old = tl.where(valid, tl.load(OLD + row * s_old_r + c * s_old_t, mask=in_row, other=0.0).to(tl.float32), 0.0)
    adv = tl.where(valid, tl.load(ADV + row * s_adv_r + c * s_adv_t, mask=in_row, other=0.0).to(tl.float32), 0.0)

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
    tl.store(GRAD + row * T + c, grad, mask=in_row & (tl.full((BLOCK,), store_grad, tl.int32) != 0))

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
    """Launch the kernel on ``[..., T]`` inputs.

    Returns ``(grad [rows, T] fp32 or None, partials [rows, blocks, 8] fp32)``.

    Inputs are viewed as ``[rows, T]`` with ``reshape`` (a view, no copy, for any 2-D strides and for
    leading dims that merge; other layouts are copied by ``reshape``) and passed with their strides.
    """
    T = logprobs.shape[-1]
    lp, old, adv, m = (x.reshape(-1, T) for x in (logprobs, old_logprobs, advantages, mask))
    rows = lp.shape[0]
    n_tblocks = triton.cdiv(T, BLOCK_T)
    grad = torch.empty((rows, T) if store_grad else (1,), dtype=torch.float32, device=lp.device)
    part = torch.empty((rows, n_tblocks, N_PARTIAL), dtype=torch.float32, device=lp.device)
    with on_device(lp):
        _policy_loss_fwd_kernel[(rows, n_tblocks)](
            lp,
            old,
            adv,
            m,
            grad,
            part,
            T,
            n_tblocks,
            lp.stride(0),
            lp.stride(1),
            old.stride(0),
            old.stride(1),
            adv.stride(0),
            adv.stride(1),
            m.stride(0),
            m.stride(1),
            float(ratio_low),
            float(ratio_high),
            float(dual_clip),
            int(store_grad),
            BLOCK=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return (grad if store_grad else None), part


def row_weights(row_count: torch.Tensor, agg: str, normalizer) -> torch.Tensor:
    """Per-row aggregation weight ``w`` (float64, ``[rows]``) with ``loss = sum_r w_r * sum_t l[r, t]``.

    ``row_count``: float64 number of valid tokens of each row. Shared by the value loss.
    """
    rows = row_count.shape[0]
    if normalizer is not None:
        den = (
            normalizer.detach().to(device=row_count.device, dtype=torch.float64)
            if isinstance(normalizer, torch.Tensor)
            else float(normalizer)
        )
    if agg == "token-mean":
        if normalizer is None:
            den = row_count.sum().clamp_min(1.0)
        return (1.0 / torch.as_tensor(den, dtype=torch.float64, device=row_count.device)).expand(rows)
    if normalizer is None:
        den = (row_count > 0).sum().clamp_min(1).to(torch.float64)
    w = 1.0 / torch.as_tensor(den, dtype=torch.float64, device=row_count.device)
    if agg == "seq-mean-token-mean":
        return w / row_count.clamp_min(1.0)
    return w.expand(rows)


def reduce_partials(part: torch.Tensor, agg: str, normalizer):
    """Loss and per-row weights from a loss kernel's partials ``part`` ``[rows, blocks, N_PARTIAL]``
    (column 0: valid count, 1: loss sum). The buffer is tiny (1/BLOCK of the tokens): it is reduced
    in float64 so counts stay exact. Returns ``(loss fp32 0-dim, w [rows], part fp64, column totals)``.
    Shared by the value loss."""
    p = part.to(torch.float64)
    w = row_weights(p[..., 0].sum(1), agg, normalizer)
    loss = (w * p[..., 1].sum(1)).sum().to(torch.float32)
    return loss, w, p, p.sum((0, 1))


def weighted_grad(grad: torch.Tensor, w: torch.Tensor, grad_loss: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Backward of ``loss = sum_r w_r sum_t l[r, t]`` from the kernel's saved per-token ``dl/dx``
    (``grad`` fp32 ``[rows, T]``): row ``r`` scales by ``w_r * grad_loss``; returned in ``shape``/``dtype``
    of the input. Shared by the value loss."""
    scale = (w * grad_loss).to(torch.float32)
    out = torch.empty(shape, dtype=dtype, device=grad.device)
    torch.mul(grad, scale[:, None], out=out.view(grad.shape))
    return out


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    clip_low: float
    clip_high: float
    dual_clip: float | None
    agg: str
    normalizer: object  # None, a number or a 0-dim tensor


class PolicyLossFunction(torch.autograd.Function):
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
        ctx.mark_non_differentiable(stats)
        if store_grad:
            ctx.save_for_backward(grad, w)
        ctx.lp_shape, ctx.lp_dtype = logprobs.shape, logprobs.dtype
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises instead of going wrong
    def backward(ctx, grad_loss, grad_stats):
        grad, w = ctx.saved_tensors
        return weighted_grad(grad, w, grad_loss, ctx.lp_shape, ctx.lp_dtype), None, None, None, None


def policy_loss_triton(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip, agg, normalizer):
    """Kernel path of :func:`fastppo.policy_loss` (inputs already validated, ``mask`` bool, no float64).

    ``old_logprobs``/``advantages`` keep their dtype when it is ``logprobs``' dtype or float32 (the
    compiled combinations); anything else is converted to float32 first (a copy).
    """
    keep = (logprobs.dtype, torch.float32)
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    if old_logprobs.dtype not in keep:
        old_logprobs = old_logprobs.float()
    if advantages.dtype not in keep:
        advantages = advantages.float()
    cfg = PolicyLossConfig(clip_low, clip_low if clip_high is None else clip_high, dual_clip, agg, normalizer)
    loss, stats = PolicyLossFunction.apply(logprobs, old_logprobs, advantages, mask, cfg)
    return loss, dict(zip(STAT_NAMES, stats.unbind()))


def loss_kernel_specs(kernel, inputs: tuple[str, str, str], scalars: dict) -> list[CompileSpec]:
    """Every dtype combination the policy/value launchers can pick for ``kernel``: the first of the
    three float ``inputs`` (pointer names, e.g. ``("LP", "OLD", "ADV")``; stride arguments
    ``s_<name>_r/_t`` in lower case) fp32/bf16/fp16, the other two in its dtype or fp32; a bool mask,
    fp32 GRAD and PART; then the runtime ``scalars`` (name -> type). Combinations of one dtype are
    also compiled in their contiguous run-time specialization (vector loads)."""
    specs = []
    lower = [n.lower() for n in inputs]
    strides = [f"s_{n}_{x}" for n in (*lower, "m") for x in ("r", "t")]
    for first in ("fp32", "bf16", "fp16"):
        others = ["fp32"] if first == "fp32" else [first, "fp32"]
        for second in others:
            for third in others:
                dts = (first, second, third)
                sig = {name: f"*{dt}" for name, dt in zip(inputs, dts)}
                sig.update({"MASK": "*i1", "GRAD": "*fp32", "PART": "*fp32", "T": "i32", "n_tblocks": "i32"})
                sig.update(dict.fromkeys(strides, "i32"))
                sig.update(scalars)
                sig["BLOCK"] = "constexpr"
                label = " ".join(f"{n}={dt}" for n, dt in zip(lower, dts)) + f" BLOCK={BLOCK_T}"
                specs.append(CompileSpec(kernel, sig, {"BLOCK": BLOCK_T}, num_warps=NUM_WARPS, label=label))
                if first == second == third:  # contiguous inputs of one dtype: vector loads
                    specs.append(streaming_spec(specs[-1], BLOCK_T, NUM_WARPS, first))
    return specs


# Every (dtype combination, block size) the launcher can pick: logprobs fp32/bf16/fp16, the two
# constant inputs either in logprobs' dtype or fp32; one block size. compile_check compiles these.
COMPILE_SPECS = loss_kernel_specs(
    _policy_loss_fwd_kernel,
    ("LP", "OLD", "ADV"),
    {"ratio_low": "fp32", "ratio_high": "fp32", "dual_clip": "fp32", "store_grad": "i32"},
)
