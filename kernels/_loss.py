"""What the policy and value loss kernels share: block size, launch, aggregation, backward, compile specs.

Both kernels have one signature shape::

    kernel(X1, X2, X3, MASK, GRAD, PART, T, n_tblocks, s_x1_r, s_x1_t, ..., s_m_r, s_m_t, *scalars, store_grad, BLOCK)

with three float ``[rows, T]`` inputs, a bool mask, the unweighted per-token gradient ``GRAD``
``[rows, T]`` fp32 (written when ``store_grad``) and per-program partial sums ``PART``
``[rows, n_tblocks, N_PARTIAL]`` fp32, column 0 the valid count and 1 the loss sum.

Aggregation weights. Every aggregation mode is ``loss = sum_rows w_row * sum_t l[row, t]``, with one
weight per row (sequence): ``1/N_tokens`` (token-mean), ``1/N_seqs`` (seq-mean-token-sum) or
``1/(n_row N_seqs)`` (seq-mean-token-mean), ``normalizer`` replacing ``N_tokens``/``N_seqs``. The
weights need batch-wide counts, known only after every token has been seen, so the kernels do not
apply them: they write the *unweighted* gradient and, per program, the count and loss sum of its
piece of a row. Torch then sums that tiny buffer (deterministically, no atomics) into the row counts,
the weights and the loss. This costs no extra pass over the mask (computing ``mask.sum(-1)`` before
the launch would), keeps one compiled kernel for all three modes, and the backward is one
elementwise op: ``grad = saved_grad * (grad_output * w_row)``.
"""

from __future__ import annotations

import torch
import triton

from fastppo.kernels._jit import CompileSpec, on_device, streaming_spec
from fastppo.kernels._streaming import row_strides, rows2d

# 512 tokens per program: 4 fp32 (16 bytes) per thread at 4 warps, so loads vectorise, and a
# [64, 1024] batch still gives 128 programs to spread over the SMs. Fixed, independent of T.
BLOCK_T = 512
NUM_WARPS = 4
N_PARTIAL = 8  # partial sums per program (the policy loss uses 7, the value loss 5)


def kernel_inputs(first: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``others`` detached (no gradient flows to them), each kept in its dtype when it is ``first``'s or
    float32 (the compiled combinations), else converted to float32 (a copy)."""
    keep = (first.dtype, torch.float32)
    return tuple(x.detach() if x.dtype in keep else x.detach().float() for x in others)


def launch_loss_kernel(kernel, inputs: tuple, mask: torch.Tensor, scalars: tuple, store_grad: bool):
    """Launch ``kernel`` on three ``[..., T]`` ``inputs`` and ``mask``, with its runtime ``scalars``.

    Returns ``(grad [rows, T] fp32 or None, partials [rows, blocks, N_PARTIAL] fp32)``. Inputs are
    viewed as ``[rows, T]`` (a view, no copy, for any 2-D strides and for leading dims that merge;
    other layouts are copied by ``reshape``) and passed with their strides.
    """
    xs = [rows2d(x) for x in (*inputs, mask)]
    rows, T = xs[0].shape
    n_tblocks = triton.cdiv(T, BLOCK_T)
    dev = xs[0].device
    grad = torch.empty((rows, T) if store_grad else (1,), dtype=torch.float32, device=dev)
    part = torch.empty((rows, n_tblocks, N_PARTIAL), dtype=torch.float32, device=dev)
    with on_device(xs[0]):
        kernel[(rows, n_tblocks)](
            *xs,
            grad,
            part,
            T,
            n_tblocks,
            *row_strides(*xs),
            *scalars,
            int(store_grad),
            BLOCK=BLOCK_T,
            num_warps=NUM_WARPS,
        )
    return (grad if store_grad else None), part


def row_weights(row_count: torch.Tensor, agg: str, normalizer) -> torch.Tensor:
    """Per-row aggregation weight ``w`` (float64, ``[rows]``) with ``loss = sum_r w_r * sum_t l[r, t]``.

    ``row_count``: float64 number of valid tokens of each row.
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
    in float64 so counts stay exact. Returns ``(loss fp32 0-dim, w [rows], part fp64, column totals)``."""
    p = part.to(torch.float64)
    w = row_weights(p[..., 0].sum(1), agg, normalizer)
    loss = (w * p[..., 1].sum(1)).sum().to(torch.float32)
    return loss, w, p, p.sum((0, 1))


class WeightedLossFunction(torch.autograd.Function):
    """Base of the loss Functions: ``forward(ctx, x, a, b, mask, cfg) -> (loss fp32 0-dim, stats)``,
    differentiable in ``x`` only, ends with :meth:`finish`. The backward of ``loss = sum_r w_r sum_t
    l[r, t]`` is the kernel's saved per-token ``dl/dx`` (fp32 ``[rows, T]``), row ``r`` scaled by
    ``w_r * grad_loss``, in the shape and dtype of ``x``."""

    @staticmethod
    def finish(ctx, x: torch.Tensor, grad, w: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor):
        """The end of ``forward``: ``stats`` marked non-differentiable, what the backward needs saved
        (``grad`` is None when ``x`` needs no gradient); returns ``(loss, stats)``."""
        ctx.mark_non_differentiable(stats)
        if grad is not None:
            ctx.save_for_backward(grad, w)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises instead of going wrong
    def backward(ctx, grad_loss, grad_stats):
        grad, w = ctx.saved_tensors
        scale = (w * grad_loss).to(torch.float32)
        out = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=grad.device)
        torch.mul(grad, scale[:, None], out=out.view(grad.shape))
        return out, None, None, None, None


def loss_kernel_specs(kernel, inputs: tuple[str, str, str], scalars: dict) -> list[CompileSpec]:
    """Every dtype combination the launchers can pick for ``kernel``: the first of the three float
    ``inputs`` (pointer names, e.g. ``("LP", "OLD", "ADV")``; stride arguments ``s_<name>_r/_t`` in
    lower case) fp32/bf16/fp16, the other two in its dtype or fp32 (:func:`kernel_inputs`); a bool
    mask, fp32 GRAD and PART; then the runtime ``scalars`` (name -> type) and ``store_grad``.
    Combinations of one dtype are also compiled in their contiguous run-time specialization (vector
    loads)."""
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
                sig.update({"store_grad": "i32", "BLOCK": "constexpr"})
                label = " ".join(f"{n}={dt}" for n, dt in zip(lower, dts)) + f" BLOCK={BLOCK_T}"
                specs.append(CompileSpec(kernel, sig, {"BLOCK": BLOCK_T}, num_warps=NUM_WARPS, label=label))
                if first == second == third:  # contiguous inputs of one dtype: vector loads
                    specs.append(streaming_spec(specs[-1], BLOCK_T, NUM_WARPS, first))
    return specs
