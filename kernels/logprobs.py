"""Triton kernels: per-token log-probabilities and entropy from logits ``[..., V]``.

Forward, one program per ``ROWS`` rows: a single pass over each row with the online logsumexp /
entropy accumulator of :mod:`fastppo.kernels._lse` (float32), the temperature fused (``z = x / T``),
then one scalar load of the label's logit:

    logprob = z[y] - lse,     entropy = -sum p log p          (0 for rows with y == ignore_index)

It saves only per-row statistics (the max ``m`` and ``log s`` with ``lse = m + log s``, and the
entropy), never the probabilities. Backward recomputes ``p = exp((z - m) - log s)`` block by block
and writes, in the logits' dtype,

    dx = (g_lp * (onehot(y) - p) - g_ent * p * (log p + H)) / T

into a fresh buffer, or into the logits buffer itself with ``inplace_backward=True``.

Batch invariance: the block sizes depend only on ``V`` (never on ``N``) and each row's reduction only
on that row, so a row gives bit-identical results alone or inside any batch (the first PPO step then
has ratio exactly 1 whatever the micro-batching).

Vector loads: when ``V`` and the strides are multiples of 16 (151936, 128256, 50304, ...) Triton's
launcher specializes the kernel for aligned rows and each thread reads its 16 values as two 16-byte
loads (``compile_check`` holds it to that). An odd ``V`` (GPT-2's 50257) gets 2-byte loads: aligning
the loads per row would shift the block boundaries by each row's address, and with them the order of
the reduction, which would break the batch invariance above. Pad the vocabulary to a multiple of 16
(as most checkpoints already do) for full bandwidth.

Rows are addressed through a ``[O, T, V]`` view (:func:`fastppo._layout.rows3d`): row ``r``
starts at ``(r // T) * stride_o + (r % T) * stride_i``, which covers ``logits[:, :-1]`` without a copy.
Offsets are int64 because ``N * V`` exceeds 2^31 at real sizes (8192 x 151936 = 1.2e9, and more).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo._layout import overlapping_rows, rows3d
from fastppo.kernels._jit import CompileSpec, jit, launch_spec, on_device
from fastppo.kernels._lse import online_lse_finish, online_lse_step
from fastppo.kernels._testing import NO_HOOKS, LaunchHooks, current_hooks


@jit
def _logprobs_fwd_kernel(
    X,
    Labels,
    LP,
    ENT,
    STATS,
    N,
    T_inner,
    stride_o,
    stride_i,
    V,
    inv_temp,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ROWS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    base = (r64 // T_inner) * stride_o + (r64 % T_inner) * stride_i
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        valid = row_ok[:, None] & (c < V)[None, :]
        x = tl.load(X + base[:, None] + c[None, :], mask=valid, other=float("-inf"))
        z = x.to(tl.float32) * inv_temp
        if COMPUTE_ENTROPY:
            # -inf logits (padding lanes, and banned tokens of a masked vocabulary) contribute nothing;
            # counting them as invalid keeps the entropy term free of 0 * -inf = NaN.
            m, s, t = online_lse_step(m, s, t, z, z > float("-inf"))
        else:
            # The same update without the entropy term: the variant entropy=False launches.
            # (Ignoring t from online_lse_step leaves its loop-carried work in the PTX.)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
            e = tl.exp(z - m_ref[:, None])  # exp(-inf) = 0 for padding and banned tokens
            s = s * tl.exp(m - m_ref) + tl.sum(e, axis=1)
            m = m_new
    m, log_s, ent = online_lse_finish(m, s, t)

    label = tl.load(Labels + rows, mask=row_ok, other=ignore_index)
    use = row_ok & (label != ignore_index)
    target = tl.load(X + base + tl.where(use, label, 0), mask=use, other=0.0).to(tl.float32) * inv_temp
    tl.store(LP + rows, tl.where(use, (target - m) - log_s, 0.0), mask=row_ok)
    tl.store(STATS + rows, m, mask=row_ok)  # [2, N]: the row max, then log s (lse = m + log s)
    tl.store(STATS + N + rows, log_s, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(ENT + rows, tl.where(use, ent, 0.0), mask=row_ok)


@jit
def _logprobs_bwd_kernel(
    X,
    DX,
    Labels,
    STATS,
    ENT,
    G_LP,
    G_ENT,
    N,
    T_inner,
    stride_o,
    stride_i,
    dstride_o,
    dstride_i,
    V,
    inv_temp,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ROWS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    o, i = r64 // T_inner, r64 % T_inner
    base = o * stride_o + i * stride_i
    dbase = o * dstride_o + i * dstride_i
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(Labels + rows, mask=row_ok, other=ignore_index)
    use = row_ok & (label != ignore_index)
    m = tl.load(STATS + rows, mask=row_ok, other=0.0)
    log_s = tl.load(STATS + N + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(G_LP + rows, mask=use, other=0.0)
    if COMPUTE_ENTROPY:
        ent = tl.load(ENT + rows, mask=use, other=0.0)
        g_ent = tl.load(G_ENT + rows, mask=use, other=0.0)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        valid = row_ok[:, None] & (c < V)[None, :]
        # -inf past the vocabulary: p = 0 there, so nothing large is computed in the padding lanes.
        x = tl.load(X + base[:, None] + c[None, :], mask=valid, other=float("-inf"))
        logp = (x.to(tl.float32) * inv_temp - m[:, None]) - log_s[:, None]  # see online_lse_finish
        p = tl.exp(logp)
        dz = tl.where(c[None, :] == label[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
        if COMPUTE_ENTROPY:
            # p == 0 where x == -inf (padding lanes, masked vocabulary): the floor keeps that term
            # 0 * finite = 0 rather than 0 * -inf = NaN, and changes nothing where p > 0 (logp > -104).
            dz -= g_ent[:, None] * (p * (tl.maximum(logp, -1e30) + ent[:, None]))
        # Ignored rows get exactly 0 (the buffer may be fresh, or the logits themselves).
        dz = tl.where(use[:, None], dz * inv_temp, 0.0)
        tl.store(DX + dbase[:, None] + c[None, :], dz.to(DX.dtype.element_ty), mask=valid)


# --- launch configuration -------------------------------------------------------------------------
# A function of V alone (never of N): that is what makes rows batch-invariant.
MIN_BLOCK_V = 64  # small vocabularies: pad the block and put several rows in a program instead
MAX_BLOCK_V = 4096  # 16 fp32 values per thread at 8 warps: no spills; 151936 -> 38 blocks, ~2% tail waste
BLOCK_ELEMS = 1024  # rows per program for small V: ROWS * BLOCK_V = 1024


def launch_config(V: int) -> dict:
    """``BLOCK_V``, ``ROWS`` and ``num_warps`` for vocabulary size ``V`` (independent of N and of the dtype)."""
    block = min(max(triton.next_power_of_2(V), MIN_BLOCK_V), MAX_BLOCK_V)
    rows = max(1, BLOCK_ELEMS // block)
    # 8 warps everywhere: at 4, the sm_90 build of the 8-row x 128-column forward spills with one of
    # the supported Tritons (a ptxas quirk at 40 registers); at 8 no configuration spills.
    return {"BLOCK_V": block, "ROWS": rows, "num_warps": 8}


NUM_STAGES = 1  # a streaming reduction: no dot to pipeline, and shared-memory staging would only cost occupancy


def _launch_args(N: int, V: int, entropy: bool) -> tuple[tuple, dict]:
    """The grid over ``N`` rows of ``V`` and the launch's keyword arguments (constexprs, warps, stages)."""
    cfg = launch_config(V)
    kwargs = dict(
        BLOCK_V=cfg["BLOCK_V"],
        ROWS=cfg["ROWS"],
        COMPUTE_ENTROPY=entropy,
        num_warps=cfg["num_warps"],
        num_stages=NUM_STAGES,
    )
    return (triton.cdiv(N, cfg["ROWS"]),), kwargs


def logprobs_forward(
    x3: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    entropy: bool,
    hooks: LaunchHooks = NO_HOOKS,
):
    """Launch the forward on ``x3 [O, T, V]`` (unit column stride), ``labels [N]`` int64 contiguous.

    Returns ``(logprobs [N], entropy [N] or None, stats [2, N])``, float32; ``stats`` holds each row's
    max and log-sum (``lse = stats[0] + stats[1]``), what the backward needs. ``hooks``
    (:mod:`fastppo.kernels._testing`) records the launch as ``"fwd"``.
    """
    O, T, V = x3.shape
    N = O * T
    lp = torch.empty(N, dtype=torch.float32, device=x3.device)
    stats = torch.empty(2, N, dtype=torch.float32, device=x3.device)
    ent = torch.empty(N, dtype=torch.float32, device=x3.device) if entropy else None
    grid, kwargs = _launch_args(N, V, entropy)
    hooks.note("fwd", **kwargs, dtype=x3.dtype)
    with on_device(x3):
        _logprobs_fwd_kernel[grid](
            x3,
            labels,
            lp,
            ent if entropy else lp,
            stats,
            N,
            T,
            x3.stride(0),
            x3.stride(1),
            V,
            inv_temp,
            ignore_index,
            **kwargs,
        )
    return lp, ent, stats


def logprobs_backward(
    x3, out3, labels, stats, ent, g_lp, g_ent, inv_temp: float, ignore_index: int, hooks: LaunchHooks = NO_HOOKS
):
    """Launch the backward: reads ``x3 [O, T, V]``, writes ``out3`` (same shape; may be ``x3`` itself).

    ``ent``/``g_ent`` are None for the variant without entropy; ``stats`` is the forward's ``[2, N]``,
    the others are ``[N]`` float32 contiguous. ``hooks`` records the launch as ``"bwd"``.
    """
    O, T, V = x3.shape
    N = O * T
    entropy = ent is not None
    grid, kwargs = _launch_args(N, V, entropy)
    hooks.note("bwd", **kwargs, dtype=x3.dtype, inplace=out3.data_ptr() == x3.data_ptr())
    with on_device(x3):
        _logprobs_bwd_kernel[grid](
            x3,
            out3,
            labels,
            stats,
            ent if entropy else g_lp,
            g_lp,
            g_ent if entropy else g_lp,
            N,
            T,
            x3.stride(0),
            x3.stride(1),
            out3.stride(0),
            out3.stride(1),
            V,
            inv_temp,
            ignore_index,
            **kwargs,
        )


class LogprobsEntropyTriton(torch.autograd.Function):
    """forward(logits [..., V] fp16/bf16/fp32 viewable by ``rows3d``, labels [N] int64, temperature,
    ignore_index, compute_entropy, inplace_backward) -> (logprobs [N] fp32, entropy [N] fp32 or None)."""

    @staticmethod
    def forward(
        ctx, logits, labels, temperature: float, ignore_index: int, compute_entropy: bool, inplace_backward: bool
    ):
        x3 = rows3d(logits)
        hooks = current_hooks()  # read in the caller's context: a CUDA backward runs on autograd's own thread
        lp, ent, stats = logprobs_forward(x3, labels, 1.0 / temperature, ignore_index, compute_entropy, hooks)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        ctx.save_for_backward(logits, labels, stats, ent)
        ctx.options = (temperature, ignore_index, inplace_backward)
        ctx.hooks = hooks
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, labels, stats, ent = ctx.saved_tensors
        temperature, ignore_index, inplace = ctx.options
        x3 = rows3d(logits)
        g_lp = torch.zeros_like(stats[0]) if g_lp is None else g_lp.float().contiguous()
        if g_ent is None:  # entropy not computed, or not part of the loss: the variant without it
            ent = None
        else:
            g_ent = g_ent.float().contiguous()
        if inplace and not overlapping_rows(x3):
            out3, grad = x3, logits
        else:
            out3 = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device)
            grad = out3.view(logits.shape)
        logprobs_backward(x3, out3, labels, stats, ent, g_lp, g_ent, 1.0 / temperature, ignore_index, ctx.hooks)
        if out3 is x3:
            # The kernel wrote through a raw pointer: bump the version counter, so that autograd raises
            # (instead of silently using the gradient) if another op saved these logits for its backward.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None


def logprobs_and_entropy_triton(
    logits, labels, *, temperature=1.0, ignore_index=-100, entropy=True, inplace_backward=False
):
    """Triton path: ``logits [..., V]`` fp16/bf16/fp32 viewable by ``rows3d``, ``labels [N]`` int64 contiguous.

    Returns ``(logprobs [N], entropy [N] or None)`` float32; the caller validated the inputs.
    """
    return LogprobsEntropyTriton.apply(
        logits, labels, float(temperature), int(ignore_index), bool(entropy), bool(inplace_backward)
    )


# --- every configuration the launchers can pick, for ``python -m fastppo.kernels.compile_check`` ---
def _specs() -> list[CompileSpec]:
    specs = []
    blocks = [MIN_BLOCK_V << k for k in range((MAX_BLOCK_V // MIN_BLOCK_V).bit_length())]
    for dt in ("fp32", "bf16", "fp16"):
        for block in blocks:
            for ent in (True, False):
                launch = _launch_args(1, block, ent)[1]
                label = f"{dt} BLOCK_V={block} ROWS={launch['ROWS']} ent={int(ent)}"
                fwd_sig = {
                    "X": f"*{dt}",
                    "Labels": "*i64",
                    "LP": "*fp32",
                    "ENT": "*fp32",
                    "STATS": "*fp32",
                    "N": "i32",
                    "T_inner": "i32",
                    "stride_o": "i32",
                    "stride_i": "i32",
                    "V": "i32",
                    "inv_temp": "fp32",
                    "ignore_index": "i32",
                }
                bwd_sig = {
                    "X": f"*{dt}",
                    "DX": f"*{dt}",
                    "Labels": "*i64",
                    "STATS": "*fp32",
                    "ENT": "*fp32",
                    "G_LP": "*fp32",
                    "G_ENT": "*fp32",
                    "N": "i32",
                    "T_inner": "i32",
                    "stride_o": "i32",
                    "stride_i": "i32",
                    "dstride_o": "i32",
                    "dstride_i": "i32",
                    "V": "i32",
                    "inv_temp": "fp32",
                    "ignore_index": "i32",
                }
                # Each thread reads a contiguous run of the row: with aligned rows (V, strides multiples
                # of 16) that must be one vector load, up to 16 bytes (8 bf16 / 4 fp32 values).
                per_thread = block * launch["ROWS"] // (32 * launch["num_warps"])
                vector_bits = min(128, per_thread * (32 if dt == "fp32" else 16))
                for kern, sig, div in (
                    (_logprobs_fwd_kernel, fwd_sig, ("stride_o", "stride_i", "V")),
                    (_logprobs_bwd_kernel, bwd_sig, ("stride_o", "stride_i", "dstride_o", "dstride_i", "V")),
                ):
                    specs.append(launch_spec(kern, dict(sig), launch, label))
                    specs.append(launch_spec(kern, dict(sig), launch, label, divisible=div, min_load_bits=vector_bits))
    return specs


COMPILE_SPECS: list[CompileSpec] = _specs()
