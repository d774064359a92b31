"""Multi-turn GAE as one Triton launch: a reverse scan over time of the per-step affine maps.

verl's multi-turn GAE walks a row from ``t = T-1`` down to 0 carrying ``(nv, lg)`` = (nextvalue,
lastgaelam), both 0 at the start. A valid step is an affine map of that state::

    nv' = v_t                                  i.e.  nv' = a*nv + d
    lg' = gamma*nv + c*lg + (r_t - v_t)              lg' = b*nv + e*lg + f     (c = gamma * lam)

with ``(a, b, d, e, f) = (0, gamma, v_t, c, r_t - v_t)``;
a masked step is the identity ``(1, 0, 0, 1, 0)`` (the position is skipped). ``adv_t = lg'`` on
valid positions. Maps of this form are closed under composition, so every ``adv_t`` is the
composition of the maps of steps ``T-1 .. t`` applied to ``(0, 0)``: an inclusive scan.

Kernel: one program per row (``grid = (B,)``, one launch for the batch). It walks the row in
blocks of ``BLOCK_T`` time steps from the end, each block loaded in *reversed* time order so that a
plain forward ``tl.associative_scan`` (well-defined combine order on every Triton version) runs
from the latest step to the earliest; the state entering the block (``nv_c, lg_c``) is carried
from the previously processed block. All coefficients stay bounded: ``a`` is 0 or 1, ``e`` a
product of ``c``'s in ``[0, 1]``, ``b <= gamma`` and ``f`` a sum of deltas with weights ``<= 1``,
so the scan is as stable as the loop for any ``gamma, lam in [0, 1]`` and any ``T``.
Loads are masked by the mask, so NaN/inf on masked positions are never read.
"""

from __future__ import annotations

import torch
import triton.language as tl

from fastppo.kernels._jit import CompileSpec, jit, on_device
from fastppo.kernels._streaming import row_strides

# Time steps per block: 256 steps over 4 warps is 2 per thread, so the 5-tuple scan stays in
# registers; longer rows loop over blocks inside the kernel with a carried state.
BLOCK_T = 256
NUM_WARPS = 4


@jit
def _compose(a1, b1, d1, e1, f1, a2, b2, d2, e2, f2):
    """Map 2 after map 1 (1 comes first in scan order, i.e. is the later time step)."""
    return (
        a2 * a1,
        b2 * a1 + e2 * b1,
        a2 * d1 + d2,
        e2 * e1,
        b2 * d1 + e2 * f1 + f2,
    )


@jit
def _gae_kernel(
    R,
    V,
    M,
    ADV,
    RET,
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    gamma,
    c,
    BLOCK_T: tl.constexpr,
):
    """R, V: [B, T] float (any strides), M: [B, T] uint8 (0/1), ADV, RET: [B, T] float32 contiguous."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride and row * T can exceed 2^31
    idx = tl.arange(0, BLOCK_T)
    nv_c = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)  # scalar fp32 loop-carried state
    lg_c = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(n_blocks):
        start = (n_blocks - 1 - i) * BLOCK_T
        t = (start + BLOCK_T - 1 - idx).to(tl.int64)  # reversed time: scan element 0 is the latest step
        in_row = t < T
        m = tl.load(M + row * stride_mb + t * stride_mt, mask=in_row, other=0) != 0
        r = tl.load(R + row * stride_rb + t * stride_rt, mask=m, other=0.0).to(tl.float32)
        v = tl.load(V + row * stride_vb + t * stride_vt, mask=m, other=0.0).to(tl.float32)

        one = tl.full([BLOCK_T], 1.0, tl.float32)
        zero = tl.zeros([BLOCK_T], dtype=tl.float32)
        a = tl.where(m, zero, one)
        b = tl.where(m, zero + gamma, zero)
        d = v  # 0 on masked positions (masked load)
        e = tl.where(m, zero + c, one)
        f = r - v
        a, b, d, e, f = tl.associative_scan((a, b, d, e, f), 0, _compose)
        lg = b * nv_c + e * lg_c + f
        nv = a * nv_c + d

        adv = tl.where(m, lg, 0.0)
        out = row * T + t
        tl.store(ADV + out, adv, mask=in_row)
        tl.store(RET + out, tl.where(m, lg + v, 0.0), mask=in_row)
        # State entering the next (earlier) block: the scan's last element (time `start`).
        last = idx == BLOCK_T - 1
        nv_c = tl.sum(tl.where(last, nv, 0.0), axis=0)
        lg_c = tl.sum(tl.where(last, lg, 0.0), axis=0)


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Launch the kernel on validated ``[B, T]`` inputs (fp16/bf16/fp32, mask bool). Returns float32 (adv, ret)."""
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    if rewards.dtype != values.dtype:  # one pointer dtype for both: fewer compiled variants
        rewards, values = rewards.float(), values.float()
    m = mask.view(torch.uint8)  # bool -> uint8 is a free reinterpretation (strides kept)
    with on_device(rewards):
        _gae_kernel[(B,)](
            rewards,
            values,
            m,
            adv,
            ret,
            T,
            *row_strides(rewards, values, m),
            float(gamma),
            float(gamma) * float(lam),
            BLOCK_T=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return adv, ret


def _spec(dt: str, stride: str) -> CompileSpec:
    sig = {
        "R": f"*{dt}",
        "V": f"*{dt}",
        "M": "*u8",
        "ADV": "*fp32",
        "RET": "*fp32",
        "T": "i32",
        "stride_rb": stride,
        "stride_rt": stride,
        "stride_vb": stride,
        "stride_vt": stride,
        "stride_mb": stride,
        "stride_mt": stride,
        "gamma": "fp32",
        "c": "fp32",
    }
    return CompileSpec(
        _gae_kernel, sig, {"BLOCK_T": BLOCK_T}, num_warps=NUM_WARPS, label=f"{dt} strides={stride} BLOCK_T={BLOCK_T}"
    )


# Strides are i32 at run time (Python ints below 2**31, what every real batch has), i64 beyond.
COMPILE_SPECS = [_spec(dt, stride) for dt in ("fp32", "bf16", "fp16") for stride in ("i32", "i64")]
