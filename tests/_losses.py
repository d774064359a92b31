"""The harness the policy-loss, value-loss and KL tests share: random masks, the float64 loop's
aggregation weights, running an op on a backend, and the checks every loss op must pass.

A loss op here is ``op(x, *constants, mask, **opts) -> (loss, stats)`` whose gradient goes to ``x``
(``fastppo.policy_loss``, ``fastppo.value_loss``); ``fastppo.kl_penalty`` shares the input and
bad-input helpers only.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from tests._tol import assert_within_rule, relayout, scalar, to_cpu, to_kernel_device

BACKENDS = ("torch", "triton")
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def random_mask(shape, g: torch.Generator, kind: str = "holes") -> torch.Tensor:
    """``holes``: ~30 % of positions masked; ``row``: also the first sequence fully masked;
    ``none``: everything masked; ``all``: nothing masked."""
    mask = torch.rand(shape, generator=g) > 0.3
    if kind == "row":
        mask.reshape(-1, shape[-1])[0] = False
    elif kind == "none":
        mask[...] = False
    elif kind == "all":
        mask[...] = True
    return mask


def loop_weights(M: list[list[bool]], agg: str, normalizer=None) -> list[float]:
    """Per-sequence weight of each valid token's loss in the float64 loops: the aggregation ``agg``
    (see :mod:`fastppo.losses`) written out, ``normalizer`` replacing its denominator."""
    counts = [sum(row) for row in M]
    norm = None if normalizer is None else float(normalizer)
    if agg == "token-mean":
        return [1.0 / (norm or max(sum(counts), 1))] * len(M)
    seqs = norm or max(sum(c > 0 for c in counts), 1)
    return [1.0 / seqs / (max(c, 1) if agg == "seq-mean-token-mean" else 1) for c in counts]


def run_loss(op, backend, x, *rest, **opts):
    """``op(x, *rest, **opts)`` on ``backend`` and d loss / d x. The CPU inputs move to the backend's
    test device (CUDA for compiled Triton kernels); loss, gradient and stats come back on the CPU."""
    x, *rest = to_kernel_device(x, *rest, backend=backend)
    x = x.detach().requires_grad_()
    with fastppo.use_backend(backend):
        loss, stats = op(x, *rest, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    return to_cpu((loss, grad, stats))


def check_all_masked(op, backend, inputs, mask, want_stats: dict, **opts):
    """An all-masked batch (NaN/inf in it included): loss 0 still in the graph, zero gradient,
    ``want_stats`` exactly."""
    x, *rest = to_kernel_device(*inputs, mask, backend=backend)
    x = x.requires_grad_()
    with fastppo.use_backend(backend):
        loss, stats = op(x, *rest, **opts)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert {k: v.item() for k, v in stats.items()} == want_stats


def check_masked_garbage_does_not_leak(op, backend, inputs, mask, **opts):
    """NaN, +inf and -inf written at the masked positions of the inputs change nothing: same loss,
    gradient (0 there) and stats, bit for bit."""
    clean = run_loss(op, backend, *inputs, mask, **opts)
    bad = [t.clone() for t in inputs]
    for t, val in zip(bad, (math.nan, math.inf, -math.inf)):
        t[~mask] = val
    dirty = run_loss(op, backend, *bad, mask, **opts)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    assert torch.equal(dirty[1][~mask], torch.zeros(int((~mask).sum())))
    for k in clean[2]:
        assert torch.equal(clean[2][k], dirty[2][k]), k


def check_gradient_accumulation(op, backend, inputs, mask, splits, *, agg, tensor_normalizer, **opts):
    """Micro-batches (row slices ``splits``) with ``normalizer`` = the global count (valid tokens
    for token-mean, valid sequences for the seq modes; a 0-dim tensor on the inputs' device or an
    int) give, summed, the full-batch loss and gradient."""
    full_loss, full_grad, _ = run_loss(op, backend, *inputs, mask, agg=agg, **opts)
    x, *rest, m = to_kernel_device(inputs[0].detach(), *inputs[1:], mask, backend=backend)
    norm = m.sum() if agg == "token-mean" else (m.sum(-1) > 0).sum()
    if not tensor_normalizer:
        norm = int(norm)
    x.requires_grad_()
    total = 0.0
    with fastppo.use_backend(backend):
        for rows in splits:
            loss, _ = op(x[rows], *(t[rows] for t in rest), m[rows], agg=agg, normalizer=norm, **opts)
            loss.backward()
            total += loss.item()
    assert total == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(x.grad.cpu(), full_grad, atol=1e-7, rtol=1e-5)


def check_bad_input(op, args: dict, change: dict, exc, match, backend):
    """``op(*args.values(), **kwargs)`` with ``change`` applied (to a positional argument of
    ``args`` or as a keyword option) raises ``exc`` matching ``match``. The tensors move to the
    kernel's device first, so that the change is the only defect (meta tensors and non-tensors stay)."""
    args, kwargs = dict(args), {}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v
    args = dict(zip(args, to_kernel_device(*args.values(), backend=backend)))
    kwargs = dict(zip(kwargs, to_kernel_device(*kwargs.values(), backend=backend)))
    with fastppo.use_backend(backend), pytest.raises(exc, match=match):
        op(*args.values(), **kwargs)


def check_kernel_matches_loop(op, loop, inputs, mask, *, layout, dtype, **opts):
    """The Triton kernel of a loss op under the tolerance rule against the float64 ``loop`` (on the
    inputs rounded to ``dtype``), with the torch backend in ``dtype`` as the error budget: loss,
    gradient and every stat. The inputs get ``layout`` (``tests._tol.relayout``) on the CPU and on the
    kernel's device alike. Returns the loop's stats, for the caller's checks of what the case covers."""
    inputs = (*(t.to(dtype) for t in inputs), mask)
    cpu = [relayout(t, layout) for t in inputs]
    dev = [relayout(t, layout) for t in to_kernel_device(*inputs)]  # the layout made on the kernel's device
    assert [t.stride() for t in dev] == [t.stride() for t in cpu]
    want, want_grad, want_stats, scale = loop(*cpu, **opts)  # truth on the rounded inputs
    t_loss, t_grad, t_stats = run_loss(op, "torch", *cpu, **opts)
    k_loss, k_grad, k_stats = run_loss(op, "triton", *dev, **opts)

    assert k_loss.dtype == torch.float32 and k_grad.dtype == dtype and k_grad.shape == cpu[0].shape
    assert_within_rule(scalar(k_loss), scalar(t_loss), scalar(want), atol=1e-6 * (1 + scale), name="loss")
    g_atol = 4 * torch.finfo(dtype).eps * want_grad.abs().max().item() + 1e-30
    assert_within_rule(k_grad, t_grad, want_grad, atol=g_atol, name="grad")
    assert k_stats.keys() == want_stats.keys()
    for k in want_stats:
        assert k_stats[k].dtype == torch.float32 and k_stats[k].shape == () and not k_stats[k].requires_grad
        assert_within_rule(scalar(k_stats[k]), scalar(t_stats[k]), scalar(want_stats[k]), atol=2e-6, name=k)
    return want_stats
