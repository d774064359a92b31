"""Backward of the fused linear log-prob/entropy (:mod:`fastppo.kernels.linear_logprobs`), and the
logits tile both directions recompute.

With ``z = (hidden @ weight.T + bias) / T``, ``p = softmax(z)``, per-row ``lse`` (as max + log-sum)
and entropy ``Hn`` saved by the forward, and upstream gradients ``g_lp``, ``g_ent`` (zero on ignored rows):

    dz = g_lp * (onehot(y) - p) - g_ent * p * (log p + Hn),       dlogits = dz / T
    d hidden = dlogits @ weight,   d weight = dlogits.T @ hidden,   d bias = dlogits.sum(0)

The vocabulary is walked in chunks of ``Vc`` columns (a few % of V, so the ``[N, V]`` logits never
exist); for each chunk:

1. ``_linear_dz_kernel`` (grid: token blocks x vocab blocks of the chunk) recomputes the logits tile
   with ``tl.dot`` (float32 accumulation), forms ``dlogits`` in float32 and writes it, in the compute
   dtype, into a reused ``[N, Vc]`` buffer, plus per-token-block column sums for ``d bias``;
2. ``d weight[chunk] = dlogits_chunk.T @ hidden`` is one matmul over all N tokens (cuBLAS): each
   element of ``d weight`` is accumulated in float32 inside that matmul and rounded once, without the
   ``[V, H]`` float32 buffer a token-chunked loop would need (1.2 GB at V=151936, H=4096);
3. ``_linear_dx_kernel`` adds ``dlogits_chunk @ weight[chunk]`` (float32 ``tl.dot``) to ``d hidden``.
   Across chunks the running sum is kept as a float32 value split in two 16-bit halves: ``hi`` (the
   ``d hidden`` output's own memory, viewed as bfloat16) and ``lo = bf16(sum - hi)`` (one ``[N, H]``
   bfloat16 buffer), about 16 significant bits, rounded once to the output dtype on the last chunk.
   For float32 the output itself is the accumulator.

Every step is deterministic (no atomics) and exact (no gradient filtering). Total work: the forward's
2·N·V·H flops, then 2·N·V·H each for the recompute, d weight and d hidden: 8·N·V·H, nothing redone.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastppo.kernels._jit import INTERPRET, jit, on_device

# Triton's interpreter (3.9) multiplies bfloat16 dot operands as the uint16 it stores them in: under
# the interpreter only, upcast them (exact: a bf16 x bf16 product fits float32, as on tensor cores).
_UPCAST_BF16_DOT = tl.constexpr(INTERPRET)


@jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` (float32 accumulator), with the interpreter workaround above."""
    if _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@jit
def _ptrs(base, offs, ALIGNED: tl.constexpr, CONTIG: tl.constexpr):
    """``base + offs`` for a ``[R, CONTIG]`` tile. With ALIGNED, declare what Triton would infer
    from 16-divisible arguments: rows start 16-byte aligned and run CONTIG contiguous elements. The
    launcher sets ALIGNED only when that holds (aligned base pointers, row strides and H multiples
    of 16 elements). Written out, not left to the launch-time specialization, so that ahead-of-time
    compilation (``compile_check``) sees the vectorized, pipelined kernel that runs. (The hint must
    annotate the op that makes the pointers, here, not a function argument: that one is dropped.)"""
    ptr = base + offs
    if ALIGNED:
        ptr = tl.max_contiguous(tl.multiple_of(ptr, [16, 16]), [1, CONTIG])
    return ptr


@jit
def _below(idx, bound, ALIGNED: tl.constexpr):
    """``idx < bound``; with ALIGNED (bound = H, a multiple of 16), constant over aligned groups of 16."""
    mask = idx < bound
    if ALIGNED:
        mask = tl.max_constancy(mask, [16])
    return mask


@jit
def _logits_tile(
    X,
    W,
    B,
    rows,
    row_ok,
    v0,
    col_ok,
    H,
    stride_xn,
    stride_wv,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``z = (X[rows] @ W[cols].T + B[cols]) * inv_temp`` as a ``[BLOCK_N, BLOCK_V]`` float32 tile,
    ``cols = v0 + arange(BLOCK_V)`` (``col_ok`` its mask).

    ``rows`` is int64, and so are the column offsets (``row * stride_xn`` and ``col * stride_wv``
    pass 2^31 at real sizes); X and W have unit stride along H. Masked rows/columns (and the H tail)
    load 0: their z is 0, and the callers mask them out of every reduction. ALIGNED: see ``_ptrs``.
    """
    hs = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_V).to(tl.int64) + v0
    x_row = rows[:, None] * stride_xn
    w_row = cols[:, None] * stride_wv
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        h_ok = _below(h, H, ALIGNED)
        x = tl.load(_ptrs(X, x_row + h[None, :], ALIGNED, BLOCK_H), mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(_ptrs(W, w_row + h[None, :], ALIGNED, BLOCK_H), mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0)[None, :]
    return acc * inv_temp


@jit
def _linear_dz_kernel(
    X,
    W,
    B,
    Labels,
    STATS,
    ENT,
    G_LP,
    G_ENT,
    DZ,
    DB_Part,
    N,
    H,
    v_start,
    v_end,
    stride_xn,
    stride_wv,
    stride_dz,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``DZ[n, c] = dlogits[n, v_start + c]`` for one ``[BLOCK_N, BLOCK_V]`` tile of the chunk, and
    ``DB_Part[pid_n, c] = sum_n DZ[n, c]`` (float32, before rounding) when HAS_BIAS."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk (int32: < Vc)
    v0 = v_start + pid_v * BLOCK_V
    col_ok = (v0 + tl.arange(0, BLOCK_V)) < v_end

    label = tl.load(Labels + rows, mask=row_ok, other=ignore_index)
    use = row_ok & (label != ignore_index)
    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    # A block of ignored rows (a prompt, padding) has dz = 0: skip its matmul (device-side branch).
    if tl.sum(use.to(tl.int32), axis=0) > 0:
        m = tl.load(STATS + rows, mask=use, other=0.0)  # [2, N]: row max, then log s
        log_s = tl.load(STATS + N + rows, mask=use, other=0.0)
        g_lp = tl.load(G_LP + rows, mask=use, other=0.0)
        z = _logits_tile(
            X,
            W,
            B,
            rows,
            row_ok,
            v0,
            col_ok,
            H,
            stride_xn,
            stride_wv,
            inv_temp,
            HAS_BIAS,
            ALIGNED,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        logp = (z - m[:, None]) - log_s[:, None]  # not z - lse: see _lse.online_lse_finish
        p = tl.exp(logp)
        hit = tl.arange(0, BLOCK_V)[None, :] == (label - v0).to(tl.int32)[:, None]  # int32: see the forward
        dz = tl.where(hit, g_lp[:, None], 0.0) - p * g_lp[:, None]
        if ENTROPY:
            ent = tl.load(ENT + rows, mask=use, other=0.0)
            g_ent = tl.load(G_ENT + rows, mask=use, other=0.0)
            # The floor keeps 0 * log 0 = 0 for a -inf bias (a banned token); no effect elsewhere.
            dz -= g_ent[:, None] * (p * (tl.maximum(logp, -1e30) + ent[:, None]))
        # where, not a product: padding lanes may hold inf/NaN (p of a masked column), never leaked.
        dz = tl.where(use[:, None] & col_ok[None, :], dz * inv_temp, 0.0)
    # The whole tile, tail columns included (as zeros): the d hidden kernel then reads the chunk in
    # whole blocks without a vocabulary mask (vectorized loads).
    dz_ptr = _ptrs(DZ, rows[:, None] * stride_dz + local[None, :], ALIGNED, BLOCK_V)
    tl.store(dz_ptr, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None])
    if HAS_BIAS:
        tl.store(DB_Part + pid_n * stride_dz + local, tl.sum(dz, axis=0))  # DB_Part: [blocks, Vc]


@jit
def _linear_dx_kernel(
    DZ,
    W,
    OUT,
    HI,
    LO,
    N,
    H,
    K,
    stride_dz,
    stride_wv,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    USE_LO: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``OUT[rows, hs] (+)= DZ[rows, :K] @ W[:K, hs]`` for one ``[BLOCK_N, BLOCK_H]`` tile (K step BLOCK_V).

    DZ's columns up to K rounded up to BLOCK_V exist and hold zeros past K (the dz kernel writes whole
    tiles), so only W's rows are masked. The running sum between chunks is ``HI + LO`` (two bfloat16
    halves, USE_LO) or OUT itself (float32). FIRST: nothing to add yet; LAST: write the final value
    to OUT in its dtype. HI is OUT's memory viewed as bfloat16: each element is read, then written,
    by the same program only.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = _below(hs, H, ALIGNED)
    ks = tl.arange(0, BLOCK_V)
    a_row = rows[:, None] * stride_dz
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_V):
        k = k0 + ks
        a = tl.load(_ptrs(DZ, a_row + k[None, :], ALIGNED, BLOCK_V), mask=row_ok[:, None], other=0.0)
        # int64 row offsets: k * stride_wv passes 2^31 for a large single chunk (V * H).
        b = tl.load(
            _ptrs(W, k[:, None].to(tl.int64) * stride_wv + hs[None, :], ALIGNED, BLOCK_H),
            mask=(k < K)[:, None] & h_ok[None, :],
            other=0.0,
        )
        acc = _dot(a, b, acc, DOT_PRECISION)
    offs = rows[:, None] * H + hs[None, :]
    mask = row_ok[:, None] & h_ok[None, :]
    out_ptr = _ptrs(OUT, offs, ALIGNED, BLOCK_H)
    if USE_LO:
        hi_ptr = _ptrs(HI, offs, ALIGNED, BLOCK_H)
        lo_ptr = _ptrs(LO, offs, ALIGNED, BLOCK_H)
        if not FIRST:
            acc += tl.load(hi_ptr, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
        if LAST:
            tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=mask)
        else:
            hi = acc.to(tl.bfloat16)
            tl.store(hi_ptr, hi, mask=mask)
            tl.store(lo_ptr, (acc - hi.to(tl.float32)).to(tl.bfloat16), mask=mask)
    else:
        if not FIRST:
            acc += tl.load(out_ptr, mask=mask, other=0.0)
        tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=mask)


@contextlib.contextmanager
def _full_precision_reductions():
    """cuBLAS may reduce the split-K partial sums of a bf16/fp16 matmul in 16 bits (PyTorch allows it by
    default); the d weight product reduces over all N tokens, so ask for fp32 reductions while it runs."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def linear_backward(
    hidden,
    weight,
    bias32,
    labels,
    stats,
    ent,
    g_lp,
    g_ent,
    inv_temp: float,
    ignore_index: int,
    need: tuple[bool, bool, bool],
    cfg,
    vocab_chunk: int,
    aligned: bool,
):
    """Gradients ``(d hidden [N, H], d weight [V, H], d bias [V] float32)`` (None where not needed).

    hidden [N, H], weight [V, H]: one dtype (the compute dtype), unit stride along H. bias32: [V]
    float32 or None. stats [2, N] float32 (row max, log-sum), g_lp [N] float32; ent, g_ent [N] float32
    or None (the variant without entropy). cfg: the ``LinearConfig`` (its ``dz`` and ``dx`` tiles);
    vocab_chunk: Vc, a multiple of ``cfg.dz.BLOCK_V`` (and so of ``cfg.dx.BLOCK_V``); aligned:
    hidden/weight pass ``is_aligned``. d hidden/d weight come in the compute dtype.
    """
    need_h, need_w, need_b = need
    N, H = hidden.shape
    V = weight.shape[0]
    dev, cd = hidden.device, hidden.dtype
    tz, tx = cfg.dz, cfg.dx
    entropy = ent is not None
    prec = "ieee" if cd == torch.float32 else "tf32"  # fp32: exact products (tf32 would lose 13 bits)
    chunks = [(v0, min(V, v0 + vocab_chunk)) for v0 in range(0, V, vocab_chunk)]
    # Whole dz tiles are written (zeros past the vocabulary) and read in dx blocks: both must fit Vc.
    assert vocab_chunk % tz.BLOCK_V == 0 and tz.BLOCK_V % tx.BLOCK_V == 0, (vocab_chunk, tz, tx)
    Vc = vocab_chunk
    nbn = triton.cdiv(N, tz.BLOCK_N)

    dz = torch.empty(N, Vc, dtype=cd, device=dev)
    dh = torch.empty(N, H, dtype=cd, device=dev) if need_h and H > 0 else None
    dw = torch.empty(V, H, dtype=cd, device=dev) if need_w else None
    db = torch.empty(V, dtype=torch.float32, device=dev) if need_b else None
    has_bias = bias32 is not None  # added to the recomputed logits even when bias needs no gradient
    db_part = torch.empty(nbn, Vc, dtype=torch.float32, device=dev) if has_bias else g_lp  # [nbn, Vc]: row stride Vc
    use_lo = dh is not None and cd != torch.float32 and len(chunks) > 1
    lo = torch.empty(N, H, dtype=torch.bfloat16, device=dev) if use_lo else None
    hi = None if dh is None else (dh.view(torch.bfloat16) if use_lo else dh)

    # on the tensors' device (Triton launches on the current one); cuBLAS without reduced-precision
    # split-K reductions, so that each d weight chunk is accumulated in fp32 and rounded once
    with on_device(hidden), _full_precision_reductions():
        for i, (v0, v1) in enumerate(chunks):
            _linear_dz_kernel[(nbn, triton.cdiv(v1 - v0, tz.BLOCK_V))](
                hidden,
                weight,
                bias32 if has_bias else g_lp,
                labels,
                stats,
                ent if entropy else g_lp,
                g_lp,
                g_ent if entropy else g_lp,
                dz,
                db_part,
                N,
                H,
                v0,
                v1,
                hidden.stride(0),
                weight.stride(0),
                Vc,
                inv_temp,
                ignore_index,
                HAS_BIAS=has_bias,
                ENTROPY=entropy,
                ALIGNED=aligned,
                DOT_PRECISION=prec,
                **tz.launch(),
            )
            dz_c = dz[:, : v1 - v0]
            if dw is not None:
                torch.mm(dz_c.t(), hidden, out=dw[v0:v1])
            if need_b:
                torch.sum(db_part[:, : v1 - v0], dim=0, out=db[v0:v1])
            if dh is not None:
                _linear_dx_kernel[(triton.cdiv(N, tx.BLOCK_N), triton.cdiv(H, tx.BLOCK_H))](
                    dz_c,
                    weight[v0:v1],
                    dh,
                    hi,
                    lo if use_lo else hi,
                    N,
                    H,
                    v1 - v0,
                    Vc,
                    weight.stride(0),
                    FIRST=i == 0,
                    LAST=i == len(chunks) - 1,
                    USE_LO=use_lo,
                    ALIGNED=aligned,
                    DOT_PRECISION=prec,
                    **tx.launch(),
                )
    if need_h and dh is None:  # H == 0
        dh = torch.empty(N, 0, dtype=cd, device=dev)
    return dh, dw, db
