"""PyTorch reference of the advantage estimators: GAE, masked whitening, group (critic-free) advantages.

These functions assume validated inputs (``fastppo.advantages`` checks them) and are the CPU path
of the public functions, the ground truth the Triton kernel is compared with, and the fast baseline
of ``bench/bench_gae.py``.

GAE without a Python loop over time
-----------------------------------
verl's multi-turn GAE walks each row from ``t = T-1`` down to 0 with ``nextvalue = lastgaelam = 0``::

    if mask[t]:  delta = r[t] + gamma * nextvalue - v[t];  lastgaelam = delta + gamma*lam*lastgaelam
                 adv[t] = lastgaelam;  nextvalue = v[t]
    else:        adv[t] = 0   (nextvalue and lastgaelam carried unchanged: the position is skipped)

A masked position is an identity step, so the recursion only ever sees the *valid* positions of a
row, in order. We therefore

1. **compact** each row: valid position ``t`` goes to slot ``k = cumsum(mask)[t] - 1`` (one
   ``scatter``; masked positions go to a dump column, reset to 0). In the compacted row the next
   valid value is simply the next slot, so ``delta_k = r_k + gamma * v_{k+1} - v_k`` with zeros
   past the last valid slot (that is the ``nextvalue = 0`` at the end of the row);
2. solve the now **constant-coefficient** recursion ``A_k = delta_k + c A_{k+1}`` (``c = gamma*lam``)
   by blocks of ``L = 64`` slots. Inside a block, ``A_loc[k] = sum_{j>=k} c^(j-k) delta_j`` is one
   matmul with a shared ``L x L`` triangular matrix; across blocks,
   ``A[b, k] = A_loc[b, k] + c^(L-k) * carry_b`` where ``carry_b = sum_{j>b} (c^L)^(j-b-1) A_loc[j, 0]``
   (the value at the start of the next block) is a second, ``T/L x T/L`` matmul. No loop at all;
3. **gather back** from the same slots; masked positions read the zero dump column.

Every weight is a power ``c^n`` with ``n >= 0`` computed in float64 (``0^0 = 1``), so it lies in
``[0, 1]``: nothing grows, for any ``gamma, lam in [0, 1]`` and any ``T`` (no ``c^(-t)`` rescaling,
which overflows once ``c^t`` underflows). Each output is a sum of at most ``L + T/L`` non-negatively
weighted terms, which is as accurate as the sequential loop (usually more: shorter sums).
On CUDA tensors this path uses matmuls, which run in TF32 if the user enabled
``torch.backends.cuda.matmul.allow_tf32``; the CUDA path proper is the Triton kernel.
"""

from __future__ import annotations

import functools

import torch

from fastppo.reference.common import result_dtype

# Slots per block: the in-block matmul costs B*T*L multiply-adds and the cross-block one
# B*(T/L)^2, so a moderate L keeps both small for the T of RLHF responses (1k-32k tokens).
GAE_BLOCK = 64


@functools.lru_cache(maxsize=64)
def _weights(c: float, L: int, nb: int, dtype: torch.dtype, device: torch.device):
    """The constant matrices of the blocked solve, powers taken in float64 then cast.

    ``W[j, k] = c^(j-k)`` for ``j >= k`` (so that ``delta_block @ W`` gives
    ``A_loc[k] = sum_{j>=k} c^(j-k) delta_j``), ``S[j, b] = c^(L*(j-b-1))`` for ``j > b`` (the carries),
    ``tail[k] = c^(L-k)``. All powers have exponents ``>= 0`` (``0^0 = 1``): values in [0, 1].
    """
    c64 = torch.tensor(c, dtype=torch.float64)

    def powers(n, step, shift):
        i = torch.arange(n, dtype=torch.float64)
        e = i[:, None] - i[None, :] - shift  # row j, column k
        return torch.where(e >= 0, torch.pow(c64, (e * step).clamp_min(0)), 0.0)

    W = powers(L, 1, 0)
    S = powers(nb, L, 1)
    tail = torch.pow(c64, torch.arange(L, 0, -1, dtype=torch.float64))
    return tuple(x.to(device=device, dtype=dtype) for x in (W, S, tail))


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Multi-turn GAE (module docstring). ``rewards, values [B, T]`` float, ``mask [B, T]`` bool.

    Returns ``(advantages, returns)``, ``[B, T]`` in ``result_dtype`` (float32, float64 for float64
    inputs); ``returns = advantages + values`` on valid positions, both 0 on masked positions.
    """
    dtype = result_dtype(rewards, values)
    B, T = rewards.shape
    device = rewards.device
    if B == 0 or T == 0:
        z = torch.zeros(B, T, dtype=dtype, device=device)
        return z, z.clone()
    L = GAE_BLOCK
    nb = -(-T // L)
    Tp = nb * L
    slot = mask.cumsum(1) - 1  # compacted slot of each valid position
    # Masked positions go to the dump column Tp. It is reset to 0 after the scatter, so whatever
    # they hold (NaN/inf included) never reaches an output; it then serves as the zero "nextvalue"
    # past the last valid slot and as the zero output that masked positions gather back.
    dest = torch.where(mask, slot, Tp)
    r_c = torch.zeros(B, Tp + 1, dtype=dtype, device=device).scatter_(1, dest, rewards.to(dtype))
    v_c = torch.zeros(B, Tp + 1, dtype=dtype, device=device).scatter_(1, dest, values.to(dtype))
    r_c[:, Tp] = 0
    v_c[:, Tp] = 0
    delta = r_c[:, :Tp] + gamma * v_c[:, 1:] - v_c[:, :Tp]  # [B, Tp]; 0 past the last valid slot

    c = float(gamma) * float(lam)
    W, S, tail = _weights(c, L, nb, dtype, device)
    a_loc = delta.view(B, nb, L) @ W  # [B, nb, L]: in-block solution with a zero carry
    # carry[b] = A at slot 0 of block b+1 = sum_{j>b} (c^L)^(j-b-1) A_loc[j, 0]: the value the
    # recursion enters block b with (0 for the last block).
    carry = a_loc[:, :, 0] @ S  # [B, nb]
    adv_c = r_c  # reuse the buffer: [B, Tp + 1] with a zero last column
    adv_c[:, :Tp].view(B, nb, L).copy_(torch.addcmul(a_loc, carry[:, :, None], tail))
    ret_c = adv_c + v_c  # 0 + 0 in the dump column

    adv = adv_c.gather(1, dest)
    ret = ret_c.gather(1, dest)
    return adv, ret


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + 1e-8)`` over the valid positions of the whole tensor (verl/TRL).

    ``var`` is unbiased (Bessel, ``n / (n-1)``) and taken as 0 when fewer than 2 positions are valid;
    ``shift_mean=False`` adds the mean back. Masked positions give 0. Two passes (mean, then centred
    squares) for accuracy; no host synchronisation.
    """
    dtype = result_dtype(x)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    xv = torch.where(mask, x.to(dtype), zero)
    n = mask.sum().to(dtype)
    mean = xv.sum() / n.clamp_min(1)
    centered = torch.where(mask, xv - mean, zero)
    var = torch.where(n >= 2, (centered * centered).sum() / (n - 1).clamp_min(1), zero)
    out = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


def group_advantages(scores: torch.Tensor, group_size: int, kind: str, scale: bool, eps: float) -> torch.Tensor:
    """Critic-free advantages of ``scores [N]`` in groups of ``group_size`` consecutive samples.

    grpo: ``s - mean_g`` (then ``/ (std_g + eps)`` when ``scale``); rloo: ``s - (sum_g - s) / (G-1)``
    (then ``/ (std_g + eps)`` when ``scale``). ``std_g`` is the unbiased group std of the scores.
    """
    dtype = result_dtype(scores) if scores.dtype.is_floating_point else torch.float32
    G = group_size
    s = scores.to(dtype).reshape(-1, G)
    if G == 1 or s.numel() == 0:  # G = 1 (grpo only, checked): a lone sample is its own baseline
        return torch.zeros_like(s).reshape(-1)
    total = s.sum(1, keepdim=True)
    mean = total / G
    if kind == "grpo":
        adv = s - mean
    else:  # rloo: baseline = mean of the G-1 other samples
        adv = s - (total - s) / (G - 1)
    if scale:
        adv = adv / (s.std(1, keepdim=True) + eps)
    return adv.reshape(-1)
