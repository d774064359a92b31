"""PyTorch reference of per-token log-probabilities and entropy (the CPU path, the tests' ground truth).

For logits ``x [..., V]``, labels ``y [...]`` and a temperature ``T``, with ``z = x / T``:

    lse = logsumexp(z),   logprob = z[y] - lse,   entropy H = -sum softmax(z) * log_softmax(z)

and positions whose label equals ``ignore_index`` give 0 for both and get zero gradient. Backward, with
``p = softmax(z)`` and upstream gradients ``g_lp``, ``g_ent`` of one row:

    dz = g_lp * (onehot(y) - p) - g_ent * p * (log p + H),      dx = dz / T

Both functions here work one chunk of rows at a time so that at most a chunk of float32
``[rows, V]`` (``CHUNK_BYTES``) is alive: the forward keeps only the logits reference and the per-row
logsumexp (and entropy), the backward recomputes the softmax per chunk. No float32 copy of the whole
logits, and in :func:`linear_logprobs_and_entropy_torch` the ``[N, V]`` logits never exist at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastppo._layout import overlapping_rows, rows3d
from fastppo.reference.common import result_dtype

# Bound on one chunk of compute-dtype [rows, V] (~32 MiB): large enough that a chunk of a 150k
# vocabulary still has ~50 rows (the loop overhead is negligible), small enough to be noise next to
# the [N, V] tensors the naive path allocates. The chunk holds a few temporaries of this size.
CHUNK_BYTES = 32 << 20


def chunk_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that ``rows * vocab_size`` elements of ``dtype`` fit in ``CHUNK_BYTES``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // (max(vocab_size, 1) * elem))


def _row_chunks(x3: torch.Tensor, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, r1, view)`` covering the flattened rows of ``x3 [O, T, V]`` in order.

    ``view`` is a ``[o, t, V]`` view of ``x3`` holding rows ``r0 .. r1`` (consecutive: either
    ``o == 1`` or ``t == T``) with ``r1 - r0 <= rows``: callers read it, or write into it in place.
    """
    O, T, _ = x3.shape
    if O * T == 0:  # no rows (an empty batch): nothing to yield
        return
    if rows >= T:  # whole inner rows, several outer indices per chunk
        per = rows // T
        for o0 in range(0, O, per):
            o1 = min(O, o0 + per)
            yield o0 * T, o1 * T, x3[o0:o1]
    else:
        for o in range(O):
            for t0 in range(0, T, rows):
                t1 = min(T, t0 + rows)
                yield o * T + t0, o * T + t1, x3[o : o + 1, t0:t1]


# log p below this floor has p == exp(log p) == 0 exactly (even in float64): clamping log p there turns
# 0 * log p = 0 * -inf = NaN (a banned token with a -inf logit) into 0 without touching any other term.
_LOGP_FLOOR = -1e4


def _load_chunk(view: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``[rows, V]`` ``dtype`` copy of the chunk ``view`` divided by T (one pass: cast + layout)."""
    z = torch.empty(view.shape, dtype=dtype, device=view.device)
    z.copy_(view)
    if temperature != 1.0:
        z.div_(temperature)
    return z.view(-1, view.shape[-1])


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, entropy: bool):
    """(logprob, stats, entropy or None) of each row of ``z [R, V]`` (already divided by T, owned: modified).

    ``stats [2, R]`` holds each row's max ``m`` and ``log s = logsumexp(z - m)`` (``lse = m + log s``):
    log p is computed as ``(z - m) - log s``, never ``z - lse``, whose rounding (an ulp of ``|lse|``,
    large at low temperatures) would pass into every log p and the entropy.
    """
    valid = labels != ignore_index
    m = z.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf: no -inf - (-inf)
    z.sub_(m[:, None])  # z is ours: it becomes z - m
    log_s = torch.logsumexp(z, dim=1)
    target = z.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    zero = z.new_zeros(())
    lp = torch.where(valid, target - log_s, zero)
    stats = torch.stack((m, log_s))
    if not entropy:
        return lp, stats, None
    logp = z.sub_(log_s[:, None])  # its memory becomes log p
    p = logp.exp()
    ent = -p.mul_(logp.clamp_(min=_LOGP_FLOOR)).sum(1)  # p is ours too: no third [R, V] buffer
    return lp, stats, torch.where(valid, ent, zero)


def _chunk_backward(z, rows: slice, labels, stats, ent, g_lp, g_ent, ignore_index: int, temperature: float):
    """``dz / T`` for the chunk ``z [R, V]`` of rows ``rows`` (already divided by T, owned: its memory is
    reused). ``labels``, ``stats [2, N]`` (from :func:`_chunk_forward`), ``ent``, ``g_lp``, ``g_ent``
    cover all N rows (``ent``/``g_ent`` None without the entropy term); the chunk's rows are taken here.

    ``dz = g_lp * onehot - p * (g_lp + g_ent * (log p + H))``, built in place in two ``[R, V]`` buffers.
    """
    labels, stats, g_lp = labels[rows], stats[:, rows], g_lp[rows]
    valid = labels != ignore_index
    zero = z.new_zeros(())
    g_lp = torch.where(valid, g_lp, zero)[:, None]
    logp = z.sub_(stats[0][:, None]).sub_(stats[1][:, None])
    p = logp.exp()
    if g_ent is not None:
        g_ent = torch.where(valid, g_ent[rows], zero)[:, None]
        coef = logp.clamp_(min=_LOGP_FLOOR).add_(ent[rows][:, None]).mul_(g_ent).add_(g_lp)
        dz = p.mul_(coef).neg_()
    else:
        dz = p.mul_(-g_lp)
    dz.scatter_add_(1, torch.where(valid, labels, 0)[:, None], g_lp)
    # Ignored rows: exactly 0 even if their logits are not finite. On the CPU, skip the pass when no row
    # is ignored; on a GPU always do it (cheap there), as asking would wait for the device every chunk.
    if dz.device.type != "cpu" or not bool(valid.all()):
        dz.masked_fill_(~valid[:, None], 0.0)
    return dz.div_(temperature) if temperature != 1.0 else dz


class LogprobsEntropyTorch(torch.autograd.Function):
    """Chunked log-prob/entropy over rows of ``logits`` (see the module docstring).

    forward(logits [..., V] viewable by :func:`rows3d`, labels [N] int64, temperature, ignore_index,
    compute_entropy, inplace_backward) -> (logprobs [N], entropy [N] or None), float32 (float64 for
    float64 logits). Saves the logits reference and per-row max / log-sum (and entropy) only.
    """

    @staticmethod
    def forward(
        ctx, logits, labels, temperature: float, ignore_index: int, compute_entropy: bool, inplace_backward: bool
    ):
        x3 = rows3d(logits)
        V = logits.shape[-1]
        cd = result_dtype(logits)
        N = labels.numel()
        lp = torch.empty(N, dtype=cd, device=logits.device)
        stats = torch.empty(2, N, dtype=cd, device=logits.device)
        ent = torch.empty(N, dtype=cd, device=logits.device) if compute_entropy else None
        for r0, r1, view in _row_chunks(x3, chunk_rows(V, cd)):
            z = _load_chunk(view, temperature, cd)
            lp_c, stats_c, ent_c = _chunk_forward(z, labels[r0:r1], ignore_index, compute_entropy)
            lp[r0:r1], stats[:, r0:r1] = lp_c, stats_c
            if compute_entropy:
                ent[r0:r1] = ent_c
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        ctx.save_for_backward(logits, labels, stats, ent)
        ctx.options = (temperature, ignore_index, compute_entropy, inplace_backward)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, labels, stats, ent = ctx.saved_tensors
        temperature, ignore_index, compute_entropy, inplace = ctx.options
        cd = stats.dtype
        x3 = rows3d(logits)
        V = logits.shape[-1]
        if g_lp is None:
            g_lp = torch.zeros_like(stats[0])
        g_lp = g_lp.to(cd)
        g_ent = g_ent.to(cd) if (compute_entropy and g_ent is not None) else None
        if inplace and not overlapping_rows(x3):
            out3, grad = x3, logits
        else:
            out3 = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device)
            grad = out3.view(logits.shape)
        for (r0, r1, view), (_, _, out) in zip(
            _row_chunks(x3, chunk_rows(V, cd)), _row_chunks(out3, chunk_rows(V, cd))
        ):
            z = _load_chunk(view, temperature, cd)
            dz = _chunk_backward(z, slice(r0, r1), labels, stats, ent, g_lp, g_ent, ignore_index, temperature)
            out.copy_(dz.view(out.shape))
        return grad, None, None, None, None, None


def logprobs_and_entropy_torch(
    logits, labels, *, temperature=1.0, ignore_index=-100, entropy=True, inplace_backward=False
):
    """Reference path: ``logits [..., V]`` (viewable by :func:`rows3d`), ``labels [N]`` int64, N = numel // V.

    Returns ``(logprobs [N], entropy [N] or None)``; the caller validated the inputs.
    """
    return LogprobsEntropyTorch.apply(
        logits, labels, float(temperature), int(ignore_index), bool(entropy), bool(inplace_backward)
    )


class LinearLogprobsEntropyTorch(torch.autograd.Function):
    """Log-prob/entropy of ``hidden @ weight.T + bias`` chunked over tokens, never holding ``[N, V]``.

    forward(hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64, temperature,
    ignore_index, compute_entropy) -> (logprobs [N], entropy [N] or None). Computes in float32
    (float64 if an input is float64); a weight in another dtype is converted once (a copy the size of
    the parameter). Backward recomputes each chunk's logits and accumulates d weight and d bias in the
    compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, ignore_index: int, compute_entropy: bool):
        cd = result_dtype(hidden, weight, bias)
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        lp = hidden.new_empty(N, dtype=cd)
        stats = hidden.new_empty(2, N, dtype=cd)
        ent = hidden.new_empty(N, dtype=cd) if compute_entropy else None
        step = chunk_rows(V, cd)
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            z = _linear_chunk(hidden[r0:r1].to(cd), w, b, temperature)
            lp_c, stats_c, ent_c = _chunk_forward(z, labels[r0:r1], ignore_index, compute_entropy)
            lp[r0:r1], stats[:, r0:r1] = lp_c, stats_c
            if compute_entropy:
                ent[r0:r1] = ent_c
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        ctx.save_for_backward(hidden, weight, bias, labels, stats, ent)
        ctx.options = (temperature, ignore_index, compute_entropy)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, stats, ent = ctx.saved_tensors
        temperature, ignore_index, compute_entropy = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd = stats.dtype
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        g_lp = torch.zeros_like(stats[0]) if g_lp is None else g_lp.to(cd)
        g_ent = g_ent.to(cd) if (compute_entropy and g_ent is not None) else None
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=cd, device=weight.device) if (need_b and bias is not None) else None
        step = chunk_rows(V, cd)
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            h = hidden[r0:r1].to(cd)
            z = _linear_chunk(h, w, b, temperature)
            dz = _chunk_backward(z, slice(r0, r1), labels, stats, ent, g_lp, g_ent, ignore_index, temperature)
            if dh is not None:
                dh[r0:r1] = dz @ w
            if dw is not None:
                dw.addmm_(dz.T, h)
            if db is not None:
                db += dz.sum(0)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None


def _linear_chunk(h, w, b, temperature):
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return z.div_(temperature)


def linear_logprobs_and_entropy_torch(
    hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100, entropy=True
):
    """Reference path: ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]`` int64, ``bias [V]`` or None.

    Returns ``(logprobs [N], entropy [N] or None)``; the caller validated the inputs.
    """
    return LinearLogprobsEntropyTorch.apply(
        hidden, weight, bias, labels, float(temperature), int(ignore_index), bool(entropy)
    )
