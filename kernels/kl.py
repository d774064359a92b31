"""Per-token KL penalty estimators in Triton: an elementwise forward and backward kernel.

Flow: ``_kl_fwd_kernel`` / ``_kl_bwd_kernel`` -> ``kl_fwd`` / ``kl_bwd`` (launchers) ->
``KLPenaltyFunction`` -> ``kl_penalty_triton`` (called by :func:`fastppo.kl_penalty`).

With ``d = logprobs - ref_logprobs`` (float32), the estimator ``kind`` (a constexpr, which selects a
branch of the small device functions ``_kl_value`` / ``_kl_grad`` at compile time)::

    k1 = d                 dk/dd = 1
    abs = |d|              dk/dd = sign(d)
    k2 = d^2 / 2           dk/dd = d
    k3 = clamp(exp(-dc) + dc - 1, 0, 10),  dc = clamp(d, -20, 20)
                           dk/dd = 1 - exp(-dc) where neither clamp is active, else 0

k3 is >= 0 mathematically, but ``exp(-d) + d - 1`` rounds to about -6e-8 for |d| near float32's
epsilon; the floor at 0 is a rounding guard (its gradient passes, like verl's lower clamp at -10,
which never binds), so k3 stays a valid non-negative penalty.

The gradient with respect to ``ref_logprobs`` is minus the one with respect to ``logprobs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo.kernels._jit import CompileSpec, jit, on_device, streaming_spec
from fastppo.kernels._streaming import flag, load_valid, row_block, row_strides, rows2d

KINDS = ("k1", "abs", "k2", "k3")
# 1024 elements per program at 4 warps: 8 per thread, fully vectorised loads for a pure streaming
# kernel. Fixed, independent of the shape.
BLOCK_T = 1024
NUM_WARPS = 4


@jit
def _exp_tail(x):
    """``exp(x) - 1 - x`` accurately: for |x| <= 0.5 its Taylor series (terms to x^10, truncation below
    1e-9 relative), with no cancellation; beyond, the direct formula loses at most ~3 bits. The direct
    formula at |x| ~ 1e-4 cancels every significant bit (it gives k3 = 0 where k3 is 5e-9)."""
    ax = tl.abs(x)
    series = (
        x
        * x
        * (
            0.5
            + x
            * (
                1.0 / 6
                + x
                * (
                    1.0 / 24
                    + x
                    * (
                        1.0 / 120
                        + x
                        * (1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320 + x * (1.0 / 362880 + x * (1.0 / 3628800)))))
                    )
                )
            )
        )
    )
    return tl.where(ax <= 0.5, series, (tl.exp(x) - 1.0) - x)


@jit
def _kl_value(d, KIND: tl.constexpr):
    """Per-token estimator ``k(d)`` (float32 in, float32 out)."""
    if KIND == 0:
        k = d
    elif KIND == 1:
        k = tl.abs(d)
    elif KIND == 2:
        k = 0.5 * d * d
    else:
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        k = tl.minimum(tl.maximum(_exp_tail(-dc), 0.0), 10.0)  # exp(-d) + d - 1
    return k


@jit
def _kl_grad(d, KIND: tl.constexpr):
    """``dk/dd``; at a clamp boundary the gradient passes, as torch.clamp's does."""
    if KIND == 0:
        g = tl.full(d.shape, 1.0, tl.float32)
    elif KIND == 1:
        g = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    elif KIND == 2:
        g = d
    else:
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        k = _exp_tail(-dc)
        live = (d >= -20.0) & (d <= 20.0) & (k <= 10.0)  # the floor at 0 only guards rounding: gradient passes
        g = tl.where(live, dc - k, 0.0)  # 1 - exp(-d) = d - (exp(-d) - 1 + d), exact near 0 as well
    return g


@jit
def _load_d(
    LP, REF, MASK, row, c, in_row, s_lp_r, s_lp_t, s_ref_r, s_ref_t, s_m_r, s_m_t, has_mask, BLOCK: tl.constexpr
):
    """``(d, valid)`` for one block; masked positions give d = 0 (a NaN/inf stored there cannot leak).
    Loads are masked by the row bound only: a mask that depends on data cannot be vectorised."""
    valid = tl.load(MASK + row * s_m_r + c * s_m_t, mask=in_row & flag(has_mask, BLOCK), other=1) != 0
    valid = valid & in_row
    lp = tl.load(LP + row * s_lp_r + c * s_lp_t, mask=in_row, other=0.0).to(tl.float32)
    ref = tl.load(REF + row * s_ref_r + c * s_ref_t, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(valid, lp - ref, 0.0), valid


@jit
def _kl_fwd_kernel(
    LP,
    REF,
    MASK,
    OUT,
    T,
    s_lp_r,
    s_lp_t,
    s_ref_r,
    s_ref_t,
    s_m_r,
    s_m_t,
    has_mask,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """OUT[row, t] = k(d) (0 where masked). LP/REF/MASK: [rows, T] any strides; OUT: [rows, T] fp32 contiguous."""
    row, _, c, in_row = row_block(T, BLOCK)
    d, valid = _load_d(LP, REF, MASK, row, c, in_row, s_lp_r, s_lp_t, s_ref_r, s_ref_t, s_m_r, s_m_t, has_mask, BLOCK)
    k = tl.where(valid, _kl_value(d, KIND), 0.0)
    tl.store(OUT + row * T + c, k, mask=in_row)


@jit
def _kl_bwd_kernel(
    LP,
    REF,
    MASK,
    GOUT,
    GLP,
    GREF,
    T,
    s_lp_r,
    s_lp_t,
    s_ref_r,
    s_ref_t,
    s_m_r,
    s_m_t,
    s_g_r,
    s_g_t,
    has_mask,
    need_lp,
    need_ref,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GLP = GOUT * dk/dd (in LP's dtype), GREF = -GOUT * dk/dd (in REF's dtype), each written only when needed.

    GOUT: [rows, T] fp32 any strides (the grad of a ``.sum()`` is an expanded, stride-0 tensor);
    GLP/GREF: [rows, T] contiguous.
    """
    row, _, c, in_row = row_block(T, BLOCK)
    d, valid = _load_d(LP, REF, MASK, row, c, in_row, s_lp_r, s_lp_t, s_ref_r, s_ref_t, s_m_r, s_m_t, has_mask, BLOCK)
    go = load_valid(GOUT, row, c, s_g_r, s_g_t, in_row, valid)
    g = tl.where(valid, go * _kl_grad(d, KIND), 0.0)
    tl.store(GLP + row * T + c, g.to(GLP.dtype.element_ty), mask=in_row & flag(need_lp, BLOCK))
    tl.store(GREF + row * T + c, (-g).to(GREF.dtype.element_ty), mask=in_row & flag(need_ref, BLOCK))


def _views(logprobs, ref_logprobs, mask):
    """``(lp, ref, mask)`` as ``[rows, T]`` views; no mask: a ``[1, 1]`` placeholder the kernels do not read."""
    lp, ref = rows2d(logprobs), rows2d(ref_logprobs)
    m = rows2d(mask) if mask is not None else torch.ones((1, 1), dtype=torch.bool, device=lp.device)
    return lp, ref, m


def kl_fwd(logprobs, ref_logprobs, mask, kind: int) -> torch.Tensor:
    """Per-token estimator, float32, contiguous, shape of ``logprobs``."""
    lp, ref, m = _views(logprobs, ref_logprobs, mask)
    rows, T = lp.shape
    out = torch.empty(logprobs.shape, dtype=torch.float32, device=lp.device)
    with on_device(lp):
        _kl_fwd_kernel[(rows, triton.cdiv(T, BLOCK_T))](
            lp,
            ref,
            m,
            out,
            T,
            *row_strides(lp, ref, m),
            int(mask is not None),
            KIND=kind,
            BLOCK=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return out


def kl_bwd(grad_out, logprobs, ref_logprobs, mask, kind: int, need_lp: bool, need_ref: bool):
    """``(grad_logprobs or None, grad_ref_logprobs or None)`` in the inputs' dtypes."""
    lp, ref, m = _views(logprobs, ref_logprobs, mask)
    go = rows2d(grad_out)
    rows, T = lp.shape
    # Unneeded gradients get a 1-element placeholder that the masked store never touches.
    g_lp = torch.empty(logprobs.shape if need_lp else (1,), dtype=logprobs.dtype, device=lp.device)
    g_ref = torch.empty(ref_logprobs.shape if need_ref else (1,), dtype=ref_logprobs.dtype, device=lp.device)
    with on_device(lp):
        _kl_bwd_kernel[(rows, triton.cdiv(T, BLOCK_T))](
            lp,
            ref,
            m,
            go,
            g_lp,
            g_ref,
            T,
            *row_strides(lp, ref, m, go),
            int(mask is not None),
            int(need_lp),
            int(need_ref),
            KIND=kind,
            BLOCK=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return (g_lp if need_lp else None), (g_ref if need_ref else None)


class KLPenaltyFunction(torch.autograd.Function):
    """``(logprobs, ref_logprobs, mask or None, kind index) -> per-token fp32``; differentiable in both inputs."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, mask, kind: int):
        ctx.save_for_backward(logprobs, ref_logprobs, mask)
        ctx.kind = kind
        return kl_fwd(logprobs, ref_logprobs, mask, kind)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises instead of going wrong
    def backward(ctx, grad_out):
        logprobs, ref_logprobs, mask = ctx.saved_tensors
        g_lp, g_ref = kl_bwd(
            grad_out, logprobs, ref_logprobs, mask, ctx.kind, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return g_lp, g_ref, None, None


def kl_penalty_triton(logprobs, ref_logprobs, *, kind: str, mask=None) -> torch.Tensor:
    """Kernel path of :func:`fastppo.kl_penalty` (inputs validated, ``mask`` bool or None, no float64).

    ``ref_logprobs`` keeps its dtype when it is ``logprobs``' dtype or float32; anything else is
    converted to float32 first (a differentiable copy, so its gradient still reaches the original).
    """
    if ref_logprobs.dtype not in (logprobs.dtype, torch.float32):
        ref_logprobs = ref_logprobs.float()
    return KLPenaltyFunction.apply(logprobs, ref_logprobs, mask, KINDS.index(kind))


def _specs():
    specs = []
    combos = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")]
    strides = ("T", "s_lp_r", "s_lp_t", "s_ref_r", "s_ref_t", "s_m_r", "s_m_t")
    for kind_idx, kind in enumerate(KINDS):
        for lp, ref in combos:
            const = {"KIND": kind_idx, "BLOCK": BLOCK_T}
            label = f"{kind} lp={lp} ref={ref} BLOCK={BLOCK_T}"
            sig = {"LP": f"*{lp}", "REF": f"*{ref}", "MASK": "*i1", "OUT": "*fp32"}
            sig.update(dict.fromkeys(strides, "i32"))
            sig.update({"has_mask": "i32", "KIND": "constexpr", "BLOCK": "constexpr"})
            specs.append(CompileSpec(_kl_fwd_kernel, sig, const, num_warps=NUM_WARPS, label=label))
            if lp == ref:  # contiguous inputs of one dtype: vector loads
                specs.append(streaming_spec(specs[-1], BLOCK_T, NUM_WARPS, lp))
            sig = {"LP": f"*{lp}", "REF": f"*{ref}", "MASK": "*i1", "GOUT": "*fp32", "GLP": f"*{lp}", "GREF": f"*{ref}"}
            sig.update(dict.fromkeys((*strides, "s_g_r", "s_g_t"), "i32"))
            sig.update(
                {"has_mask": "i32", "need_lp": "i32", "need_ref": "i32", "KIND": "constexpr", "BLOCK": "constexpr"}
            )
            specs.append(CompileSpec(_kl_bwd_kernel, sig, const, num_warps=NUM_WARPS, label=label))
            if lp == ref:
                specs.append(streaming_spec(specs[-1], BLOCK_T, NUM_WARPS, lp))
    return specs


# Every (estimator, dtype pair, block size) the launchers can pick: logprobs fp32/bf16/fp16 with
# ref_logprobs in the same dtype or fp32; the output and grad_output are fp32.
COMPILE_SPECS = _specs()
