"""Triton kernels: per-token log-probabilities and entropy straight from the last hidden states.

For ``hidden [N, H]``, ``weight [V, H]`` (the lm_head), ``bias [V]`` or None, labels ``y [N]`` and a
temperature ``T``:

    z = (hidden @ weight.T + bias) / T,   logprob = z[y] - logsumexp(z),   entropy = -sum p log p

(0 for both where ``y == ignore_index``), without the ``[N, V]`` logits ever reaching global memory
(the Cut Cross-Entropy / verl linear-cross-entropy approach).

Forward, ``_linear_lse_fwd_kernel``: grid (token blocks, vocabulary splits). A program computes the
logits of its ``BLOCK_N`` tokens one ``[BLOCK_N, BLOCK_V]`` tile at a time (``tl.dot`` over H in
``BLOCK_H`` steps, float32 accumulation, bias and 1/T fused), folds each tile into the online
logsumexp/entropy state of :mod:`fastppo.kernels._lse` and picks up the label's logit when it falls in
the tile. The vocabulary is split over ``S`` programs per token block so that 8192 tokens (64 blocks)
still fill a GPU's SMs; each writes its partial state ``(m, s, t, target)``, and
``_linear_lse_combine_kernel`` merges the ``S`` states per row (``S = 1`` under the interpreter). Only
per-row ``lse`` (and entropy) are saved; the backward (:mod:`fastppo.kernels.linear_logprobs_bwd`)
recomputes the logits tile by tile.

Offsets are int64: ``N * V`` and ``V * H`` pass 2^31 at real sizes. float32 inputs use
``input_precision="ieee"`` (exact float32 products; the GPU default tf32 keeps 10 mantissa bits).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from fastppo.kernels._jit import INTERPRET, CompileSpec, jit, launch_spec, on_device
from fastppo.kernels._lse import online_lse_finish, online_lse_step
from fastppo.kernels._testing import NO_HOOKS, LaunchHooks, current_hooks
from fastppo.kernels.linear_logprobs_bwd import _linear_dx_kernel, _linear_dz_kernel, _logits_tile, linear_backward


@jit
def _linear_lse_fwd_kernel(
    X,
    W,
    B,
    Labels,
    Part,
    N,
    H,
    V,
    stride_xn,
    stride_wv,
    split_size,
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
    """Partial state of tokens ``pid_n`` over vocabulary split ``pid_s`` (columns
    ``[pid_s * split_size, min(V, (pid_s + 1) * split_size))``) into ``Part [4, S, N]`` float32:
    ``m, s, t`` of the online logsumexp (``t`` only with ENTROPY) and the label's logit (0 if elsewhere)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_s = tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    label = tl.load(Labels + rows, mask=row_ok, other=ignore_index)
    use = row_ok & (label != ignore_index)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    cv = tl.arange(0, BLOCK_V)
    # A block of ignored rows (a prompt, padding) keeps the empty state: skip its matmuls.
    if tl.sum(use.to(tl.int32), axis=0) > 0:
        v_begin = pid_s * split_size
        v_end = tl.minimum(v_begin + split_size, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            col_ok = (v0 + cv) < v_end  # the vocabulary tail: V need not be a multiple of BLOCK_V
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
            # The label's logit, if in this tile. int32 tile-local indices: an int64 [BLOCK_N, BLOCK_V]
            # comparison takes registers the epilogue needs (at 128 x 128 the kernel spills).
            hit = cv[None, :] == (label - v0).to(tl.int32)[:, None]
            target += tl.sum(tl.where(hit, z, 0.0), axis=1)
            if ENTROPY:
                # A -inf bias (a banned token) is floored to a finite -3e38: exp gives 0 and the entropy
                # term 0 * finite, not 0 * -inf = NaN (a floor costs fewer registers than a mask).
                m, s, t = online_lse_step(m, s, t, tl.maximum(z, -3.0e38), col_ok[None, :])
            else:
                # The same update without the entropy term: the variant entropy=False launches.
                zm = tl.where(col_ok[None, :], z, float("-inf"))
                m_new = tl.maximum(m, tl.max(zm, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
                m = m_new
    out = Part + pid_s * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + num_s * N, s, mask=row_ok)
    if ENTROPY:
        tl.store(out + 2 * num_s * N, t, mask=row_ok)
    tl.store(out + 3 * num_s * N, target, mask=row_ok)


@jit
def _linear_lse_combine_kernel(
    Part,
    Labels,
    LP,
    ENT,
    STATS,
    N,
    num_s,
    ignore_index,
    ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the ``num_s`` partial states of each row; write logprob, entropy (ENTROPY) and the row
    statistics the backward needs, ``STATS [2, N]``: max ``m`` then ``log s`` (0 on ignored rows, so
    that it stays finite)."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    row_ok = rows < N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    target = tl.zeros([BLOCK], tl.float32)
    for k in range(num_s):
        p = Part + k * N + rows
        m_k = tl.load(p, mask=row_ok, other=float("-inf"))
        s_k = tl.load(p + num_s * N, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_k)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: no -inf - -inf
        a = tl.exp(m - m_ref)
        b = tl.exp(m_k - m_ref)
        if ENTROPY:
            # t = sum e^(z-m) (z-m) re-based on the new max: a (t + s (m - m_new)); s == 0 means empty.
            t_k = tl.load(p + 2 * num_s * N, mask=row_ok, other=0.0)
            t = a * (t + s * tl.where(s > 0.0, m - m_ref, 0.0)) + b * (
                t_k + s_k * tl.where(s_k > 0.0, m_k - m_ref, 0.0)
            )
        s = s * a + s_k * b
        m = m_new
        target += tl.load(p + 3 * num_s * N, mask=row_ok, other=0.0)
    m, log_s, ent = online_lse_finish(m, s, t)
    label = tl.load(Labels + rows, mask=row_ok, other=ignore_index)
    use = row_ok & (label != ignore_index)
    tl.store(LP + rows, tl.where(use, (target - m) - log_s, 0.0), mask=row_ok)  # see online_lse_finish
    tl.store(STATS + rows, tl.where(use, m, 0.0), mask=row_ok)
    tl.store(STATS + N + rows, tl.where(use, log_s, 0.0), mask=row_ok)
    if ENTROPY:
        tl.store(ENT + rows, tl.where(use, ent, 0.0), mask=row_ok)


# --- launch configuration -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's tile: BLOCK_N tokens x BLOCK_V vocabulary columns, reduced over H in BLOCK_H
    steps (for ``_linear_dx_kernel``: BLOCK_N x BLOCK_H of d hidden, reduced over the vocabulary in
    BLOCK_V steps)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int

    def launch(self) -> dict:
        """The launch's keyword arguments for this tile: the three block constexprs, warps and stages."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    fwd: Tiles
    dz: Tiles
    dx: Tiles


# GPU configurations, by (16-bit or float32, ALIGNED). Each must compile without spills on sm_80 and
# sm_90 with every supported Triton (compile_check holds them to it); they are chosen by register
# counts, not timed (``bench/bench_linear_logprobs.py --sweep`` times alternatives on a GPU).
GPU_CONFIGS = {
    # 16-bit, aligned: the performance path (every real model: H and strides multiples of 16).
    # 128 x 128 float32 tiles at 8 warps (64 registers/thread) plus the softmax epilogue, in the
    # specialization the launcher compiles (aligned pointers, sizes multiples of 16). The forward
    # spills on sm_90 at 3-4 stages; 2 stages of BLOCK_H = 64 keep as many bytes in flight as 4 of 32
    # (255 registers: 1 CTA per SM).
    ("16", True): LinearConfig(
        fwd=Tiles(128, 128, 64, 8, 2), dz=Tiles(128, 128, 64, 8, 3), dx=Tiles(128, 64, 128, 8, 3)
    ),
    # Unaligned (odd H or strides): scalar loads keep a pointer per element, so smaller tiles.
    ("16", False): LinearConfig(fwd=Tiles(64, 64, 32, 4, 2), dz=Tiles(64, 64, 32, 4, 2), dx=Tiles(64, 64, 32, 4, 2)),
    # float32 ("ieee" dot on CUDA cores, not the performance path): smaller tiles, 4-byte operands;
    # the FMA dot keeps both operand fragments in registers, hence 8 warps and 2 stages for the
    # forward (3 spill on sm_80). The d logits tile, with the row max and log-sum loaded apart, needs
    # more than 255 registers per thread at 4 warps; 8 warps halve the tile per thread.
    ("32", True): LinearConfig(fwd=Tiles(32, 64, 32, 8, 2), dz=Tiles(64, 64, 32, 8, 3), dx=Tiles(64, 32, 64, 4, 3)),
    # Unaligned forward at 4 warps, 1 stage: at 8 warps it spills (at 1 or 2 stages, by Triton version).
    ("32", False): LinearConfig(fwd=Tiles(32, 64, 32, 4, 1), dz=Tiles(32, 64, 32, 8, 2), dx=Tiles(32, 64, 32, 4, 2)),
}
# Interpreter: tl.dot's minimum of 16 on the token and H sides, so tests exercise those tails with
# few rows; wide vocabulary blocks, because its cost is per block (a 150k vocabulary in ~600 steps).
INTERP_CONFIG = LinearConfig(fwd=Tiles(16, 256, 32, 4, 1), dz=Tiles(16, 256, 32, 4, 1), dx=Tiles(16, 256, 32, 4, 1))

COMBINE_BLOCK = 256


def config_for(dtype: torch.dtype, aligned: bool) -> LinearConfig:
    """Tiles for the compute dtype (a fixed rule: no autotuning, so the interpreter runs one config)."""
    if INTERPRET:
        return INTERP_CONFIG
    return GPU_CONFIGS[("32" if dtype == torch.float32 else "16", aligned)]


def is_aligned(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels may declare 16-byte aligned rows and an H tail in whole groups of 16
    (``ALIGNED``): base pointers 16-byte aligned, row strides and H multiples of 16 elements (the
    buffers the backward allocates then follow). Metadata only: no device synchronization."""
    H = hidden.shape[1]
    return (
        H % 16 == 0
        and hidden.stride(0) % 16 == 0
        and weight.stride(0) % 16 == 0
        and hidden.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(N: int, V: int, device: torch.device, t: Tiles, force: int | None = None) -> int:
    """Vocabulary splits per token block: about 8 programs per SM in all (few tail waves), at most
    one per vocabulary block. One split off CUDA (nothing to fill). ``force``: that many instead
    (still at most one per vocabulary block)."""
    v_blocks = triton.cdiv(V, t.BLOCK_V)
    if force is not None:
        want = force
    elif device.type != "cuda":
        want = 1
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        want = triton.cdiv(8 * _sm_count(index), triton.cdiv(N, t.BLOCK_N))
    return max(1, min(v_blocks, want))


def vocab_chunk(N: int, V: int, H: int, t: Tiles, two_halves: bool, force: int | None = None) -> int:
    """Columns per backward chunk, a multiple of ``t.BLOCK_V``: the ``[N, Vc]`` dlogits buffer plus
    the ``[N, H]`` bfloat16 ``lo`` half of d hidden stay near 4% of a bfloat16 ``[N, V]`` logits
    tensor (``Vc + H ~ V / 25``), but Vc >= 2048 so that each chunk's matmuls stay large, and a
    single chunk when that is small anyway (2^22 elements). ``force``: that many columns instead
    (rounded up to whole tiles)."""
    if force is not None:
        vc = force
    else:
        vc = max(V // 25 - (H if two_halves else 0), 2048, (1 << 22) // max(N, 1))
    vc = triton.cdiv(vc, t.BLOCK_V) * t.BLOCK_V
    return min(vc, triton.cdiv(V, t.BLOCK_V) * t.BLOCK_V)


def linear_forward(
    hidden,
    weight,
    bias32,
    labels,
    inv_temp: float,
    ignore_index: int,
    entropy: bool,
    cfg: LinearConfig,
    aligned: bool,
    hooks: LaunchHooks = NO_HOOKS,
):
    """Launch the forward: hidden [N, H], weight [V, H] (one dtype, unit stride along H), bias32 [V]
    float32 or None, labels [N] int64 contiguous. Returns ``(logprobs [N], entropy [N] or None, stats [2, N])`` float32,
    ``stats`` = per-row max and log-sum (``lse = stats[0] + stats[1]``). ``hooks``: see
    :mod:`fastppo.kernels._testing` (``splits`` forced, the launch recorded as ``"fwd"``)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    t = cfg.fwd
    S = num_splits(N, V, dev, t, force=hooks.splits)
    split = triton.cdiv(triton.cdiv(V, t.BLOCK_V), S) * t.BLOCK_V  # a multiple of BLOCK_V
    S = triton.cdiv(V, split)  # every split non-empty
    part = torch.empty(4, S, N, dtype=torch.float32, device=dev)
    lp = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty(2, N, dtype=torch.float32, device=dev)  # per row: max, then log-sum
    ent = torch.empty(N, dtype=torch.float32, device=dev) if entropy else None
    prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
    hooks.note(
        "fwd",
        **dataclasses.asdict(t),
        ENTROPY=entropy,
        HAS_BIAS=bias32 is not None,
        ALIGNED=aligned,
        DOT_PRECISION=prec,
        splits=S,
        dtype=hidden.dtype,
    )
    with on_device(hidden):
        _linear_lse_fwd_kernel[(triton.cdiv(N, t.BLOCK_N), S)](
            hidden,
            weight,
            bias32 if bias32 is not None else lp,
            labels,
            part,
            N,
            H,
            V,
            hidden.stride(0),
            weight.stride(0),
            split,
            inv_temp,
            ignore_index,
            HAS_BIAS=bias32 is not None,
            ENTROPY=entropy,
            ALIGNED=aligned,
            DOT_PRECISION=prec,
            **t.launch(),
        )
    with on_device(part):
        _linear_lse_combine_kernel[(triton.cdiv(N, COMBINE_BLOCK),)](
            part,
            labels,
            lp,
            ent if entropy else lp,
            stats,
            N,
            S,
            ignore_index,
            ENTROPY=entropy,
            BLOCK=COMBINE_BLOCK,
            num_warps=4,
        )
    return lp, ent, stats


def _unit_h(x: torch.Tensor) -> torch.Tensor:
    """The kernels address H with unit stride (coalesced loads); anything else is copied once."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


class LinearLogprobsEntropyTriton(torch.autograd.Function):
    """forward(hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64, temperature,
    ignore_index, compute_entropy) -> (logprobs [N] float32, entropy [N] float32 or None).

    hidden/weight fp16/bf16/fp32 (two different dtypes compute in the promoted one, a converted copy);
    saves them, the labels and per-row max/log-sum (and entropy): nothing of size N x V.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, ignore_index: int, compute_entropy: bool):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to launch
        cd = torch.promote_types(hidden.dtype, weight.dtype)
        h, w = _unit_h(hidden.to(cd)), _unit_h(weight.to(cd))
        b32 = None if bias is None else bias.to(torch.float32).contiguous()
        aligned = is_aligned(h, w)
        # Read here, in the caller's context: a CUDA backward runs on autograd's own thread.
        hooks = current_hooks()
        lp, ent, stats = linear_forward(
            h, w, b32, labels, 1.0 / temperature, ignore_index, compute_entropy, config_for(cd, aligned), aligned, hooks
        )
        ctx.save_for_backward(h, w, b32, labels, stats, ent)
        ctx.options = (temperature, ignore_index, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.hooks = hooks
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        h, w, b32, labels, stats, ent = ctx.saved_tensors
        temperature, ignore_index, h_dtype, w_dtype, b_dtype = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b32 is not None
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        g_lp = torch.zeros_like(stats[0]) if g_lp is None else g_lp.float().contiguous()
        # Entropy not computed, or its output unused: the variant without the entropy term.
        use_ent = ent is not None and g_ent is not None
        g_ent = g_ent.float().contiguous() if use_ent else None
        aligned = is_aligned(h, w)
        cfg = config_for(h.dtype, aligned)
        N, H = h.shape
        V = w.shape[0]
        vc = vocab_chunk(N, V, H, cfg.dz, two_halves=h.dtype != torch.float32, force=ctx.hooks.vocab_chunk)
        ctx.hooks.note(
            "bwd",
            **dataclasses.asdict(cfg.dz),
            ENTROPY=use_ent,
            HAS_BIAS=b32 is not None,
            ALIGNED=aligned,
            vocab_chunk=vc,
            chunks=triton.cdiv(V, vc),
            dtype=h.dtype,
        )
        dh, dw, db = linear_backward(
            h,
            w,
            b32,
            labels,
            stats,
            ent if use_ent else None,
            g_lp,
            g_ent,
            1.0 / temperature,
            ignore_index,
            (need_h, need_w, need_b),
            cfg,
            vc,
            aligned,
        )
        dh = None if dh is None else dh.to(h_dtype)
        dw = None if dw is None else dw.to(w_dtype)
        db = None if db is None else db.to(b_dtype)
        return dh, dw, db, None, None, None, None


def linear_logprobs_and_entropy_triton(
    hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100, entropy=True
):
    """Triton path of :func:`fastppo.linear_logprobs_and_entropy` (inputs already validated).

    hidden [N, H] (any strides), weight [V, H], labels [N] int64 (values in [0, V) or ignore_index),
    bias [V] or None; fp16/bf16/fp32. Returns ``(logprobs [N] float32, entropy [N] float32 or None)``,
    differentiable with respect to hidden, weight and bias through both outputs.
    """
    if any(t is not None and t.dtype == torch.float64 for t in (hidden, weight, bias)):
        raise TypeError("the Triton linear log-prob kernel computes in float32: float64 inputs take the torch backend")
    labels = labels.contiguous()
    if hidden.shape[0] == 0:  # no tokens: empty outputs, still attached to the graph
        lp = hidden.sum(-1).float()
        return lp, (lp.clone() if entropy else None)
    return LinearLogprobsEntropyTriton.apply(
        hidden, weight, bias, labels, float(temperature), int(ignore_index), bool(entropy)
    )


# --- every configuration the launchers can pick, for ``python -m fastppo.kernels.compile_check`` ---
def _expect(dt: str, aligned: bool, sig: dict) -> dict:
    """What ``compile_check`` requires of a matmul kernel. ALIGNED kernels are compiled as Triton's
    launcher specializes them for aligned tensors, every integer size and stride a multiple of 16
    (``ignore_index`` excepted): their tiles must come in by 16-byte loads (cp.async), and 16-bit
    ones must use tensor cores."""
    if not aligned:
        return {}
    sizes = tuple(n for n, ty in sig.items() if ty == "i32" and n != "ignore_index")
    return {"divisible": sizes, "tensor_cores": dt != "fp32", "min_load_bits": 128}


def _specs() -> list[CompileSpec]:
    fwd_sig = {
        "X": "",
        "W": "",
        "B": "*fp32",
        "Labels": "*i64",
        "Part": "*fp32",
        "N": "i32",
        "H": "i32",
        "V": "i32",
        "stride_xn": "i32",
        "stride_wv": "i32",
        "split_size": "i32",
        "inv_temp": "fp32",
        "ignore_index": "i32",
    }
    dz_sig = {
        "X": "",
        "W": "",
        "B": "*fp32",
        "Labels": "*i64",
        "STATS": "*fp32",
        "ENT": "*fp32",
        "G_LP": "*fp32",
        "G_ENT": "*fp32",
        "DZ": "",
        "DB_Part": "*fp32",
        "N": "i32",
        "H": "i32",
        "v_start": "i32",
        "v_end": "i32",
        "stride_xn": "i32",
        "stride_wv": "i32",
        "stride_dz": "i32",
        "inv_temp": "fp32",
        "ignore_index": "i32",
    }
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        prec = "ieee" if dt == "fp32" else "tf32"
        for aligned in (True, False):
            cfg = GPU_CONFIGS[("32" if dt == "fp32" else "16", aligned)]
            tag = f"{dt} al={int(aligned)}"
            for ent in (True, False):
                for bias in (True, False):
                    const = dict(HAS_BIAS=bias, ENTROPY=ent, ALIGNED=aligned, DOT_PRECISION=prec)
                    for kern, sig, t in (
                        (_linear_lse_fwd_kernel, fwd_sig, cfg.fwd),
                        (_linear_dz_kernel, dz_sig, cfg.dz),
                    ):
                        sig = {k: (v or f"*{dt}") for k, v in sig.items()}
                        label = f"{tag} ent={int(ent)} bias={int(bias)} {t.BLOCK_N}x{t.BLOCK_V}x{t.BLOCK_H}"
                        specs.append(
                            launch_spec(kern, sig, dict(const, **t.launch()), label, **_expect(dt, aligned, sig))
                        )
            t = cfg.dx
            # One chunk: FIRST and LAST, no halves. Several: 16-bit keeps the running sum in HI + LO.
            for first, last in ((True, True), (True, False), (False, False), (False, True)):
                use_lo = dt != "fp32" and not (first and last)
                half = "*bf16" if use_lo else f"*{dt}"
                dx_sig = {
                    "DZ": f"*{dt}",
                    "W": f"*{dt}",
                    "OUT": f"*{dt}",
                    "HI": half,
                    "LO": half,
                    "N": "i32",
                    "H": "i32",
                    "K": "i32",
                    "stride_dz": "i32",
                    "stride_wv": "i32",
                }
                const = dict(FIRST=first, LAST=last, USE_LO=use_lo, ALIGNED=aligned, DOT_PRECISION=prec)
                label = f"{tag} first={int(first)} last={int(last)} {t.BLOCK_N}x{t.BLOCK_H}x{t.BLOCK_V}"
                specs.append(
                    launch_spec(
                        _linear_dx_kernel, dx_sig, dict(const, **t.launch()), label, **_expect(dt, aligned, dx_sig)
                    )
                )
    for ent in (True, False):
        specs.append(
            CompileSpec(
                _linear_lse_combine_kernel,
                {
                    "Part": "*fp32",
                    "Labels": "*i64",
                    "LP": "*fp32",
                    "ENT": "*fp32",
                    "STATS": "*fp32",
                    "N": "i32",
                    "num_s": "i32",
                    "ignore_index": "i32",
                },
                dict(ENTROPY=ent, BLOCK=COMBINE_BLOCK),
                4,
                3,
                f"ent={int(ent)}",
            )
        )
    return specs


COMPILE_SPECS: list[CompileSpec] = _specs()
