"""PPO policy loss, value loss and KL penalty estimators (public functions).

Each function validates its inputs (errors name the argument), then runs the Triton kernel
(:mod:`fastppo.kernels.policy_loss`, ``.value_loss``, ``.kl``) when :func:`fastppo._backend.use_triton`
says so, else the PyTorch reference (:mod:`fastppo.reference.losses`). Float64 inputs always take
the reference: the kernels compute in float32, float64 is there for ``gradcheck``.

Aggregation (``agg``) of a per-token loss ``l`` over ``[..., T]`` (every leading index is a sequence):

* ``"token-mean"``: ``sum_valid l / N``, ``N`` = number of valid tokens, or ``normalizer``;
* ``"seq-mean-token-sum"``: ``sum_seq (sum_valid_t l) / S``;
* ``"seq-mean-token-mean"``: ``sum_seq (mean_valid_t l) / S``;

``S`` = number of sequences with at least one valid token (fully masked sequences are left out), or
``normalizer``. Pass as ``normalizer`` the global count (of tokens for token-mean, of sequences for the
seq modes) across gradient-accumulation micro-batches and data-parallel ranks: the summed gradients
then equal the gradient of one big batch. An all-masked batch gives a loss of 0 (still part of the
graph) and a zero gradient.
"""

from __future__ import annotations

import torch

from fastppo._checks import check_choice, check_float, check_mask, check_number, check_same_device, check_same_shape
from fastppo._dispatch import dispatch
from fastppo.reference import losses as _ref
from fastppo.reference.losses import AGGS, KL_KINDS

__all__ = ["AGGS", "KL_KINDS", "kl_penalty", "policy_loss", "value_loss"]


def _check_normalizer(normalizer) -> None:
    """``None``, or a number or 0-dim real tensor > 0 (a tensor is read on the host: one sync on
    CUDA, paid so that a zero or negative count is an error instead of an inf/NaN loss). It is
    passed on as given, so a tensor normalizer keeps its device."""
    check_number("normalizer", normalizer, gt=0, allow_none=True)


def _check_tokens(tensors: dict, mask) -> torch.Tensor:
    """Float ``[..., T]`` tensors of one shape and device, and their mask; returns the mask as bool."""
    for name, t in tensors.items():
        check_float(name, t)
    name, first = next(iter(tensors.items()))
    if first.dim() == 0:
        raise ValueError(f"{name} must have shape [..., T] (at least one dimension), got a 0-dim tensor")
    check_same_shape({**tensors, "mask": mask if isinstance(mask, torch.Tensor) else None})
    mask = check_mask("mask", mask, first.shape)
    check_same_device({**tensors, "mask": mask})
    return mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer=None,
):
    """PPO clipped surrogate loss. Returns ``(loss, stats)``.

    Args:
        logprobs: ``[..., T]`` float (fp16/bf16/fp32/fp64) log-probs of the taken tokens under the
            current policy; the only input that receives a gradient.
        old_logprobs, advantages: ``[..., T]`` float, constants (no gradient).
        mask: ``[..., T]`` bool or 0/1 integer; false positions are ignored (NaN/inf there never leak).
        clip_low, clip_high: ``ratio`` is clipped to ``[1 - clip_low, 1 + clip_high]``;
            ``clip_low`` in (0, 1), ``clip_high`` > 0 (defaults to ``clip_low``; DAPO's clip-higher).
        dual_clip: ``c > 1`` enables dual clipping (verl/OpenRLHF): for ``A < 0`` the loss is at most ``-A c``.
        agg: ``"token-mean"``, ``"seq-mean-token-sum"`` or ``"seq-mean-token-mean"`` (module docstring).
        normalizer: number or 0-dim tensor > 0 replacing the denominator of ``agg`` (global token count
            for token-mean, global sequence count for the seq modes).

    Per token: ``ratio = exp(clamp(lp - old, -20, 20))``,
    ``l = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))``, dual clip ``l = min(l, -A c)`` for ``A < 0``.

    Returns:
        loss: 0-dim float32 (float64 for float64 inputs).
        stats: dict of 0-dim float32 tensors without grad, over valid tokens: ``clip_frac`` (clipped
            term strictly larger), ``clip_frac_lower`` (dual clip active), ``approx_kl`` (mean of
            ``(ratio - 1) - log ratio``), ``ratio_max``, ``ratio_min`` (1.0 when no token is valid).

    The gradient comes back in ``logprobs``' dtype: with float16 log-probs, a token whose
    ``|A| * ratio * weight`` exceeds 65504 gets an infinite gradient (as torch's own float16 would);
    pass float32 log-probs when advantages or ratios can be that large.
    """
    mask = _check_tokens({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}, mask)
    opts = dict(
        clip_low=check_number("clip_low", clip_low, gt=0.0, lt=1.0),
        clip_high=check_number("clip_high", clip_high, gt=0.0, allow_none=True),
        dual_clip=check_number("dual_clip", dual_clip, gt=1.0, allow_none=True),
        agg=check_choice("agg", agg, AGGS),
    )
    _check_normalizer(normalizer)
    return dispatch(
        "policy_loss",
        "policy_loss:policy_loss_triton",
        _ref.policy_loss,
        logprobs,
        old_logprobs,
        advantages,
        mask,
        normalizer=normalizer,
        **opts,
    )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    normalizer=None,
):
    """PPO value loss. Returns ``(loss, stats)``.

    Args:
        values: ``[..., T]`` float value predictions; the only input that receives a gradient.
        old_values, returns: ``[..., T]`` float, constants (``old_values`` is only read with ``clip``).
        mask: ``[..., T]`` bool or 0/1 integer.
        clip: ``c > 0`` enables value clipping around ``old_values``.
        agg, normalizer: as in :func:`policy_loss`.

    Per token: ``l = 0.5 (v - R)^2``, or with ``clip``:
    ``l = 0.5 max((v - R)^2, (clamp(v, old - c, old + c) - R)^2)``.

    Returns:
        loss: 0-dim float32 (float64 for float64 inputs).
        stats: dict of 0-dim float32 tensors over valid tokens: ``clip_frac`` (clipped term strictly
            larger), ``vpred_mean`` (mean of ``v``), ``error_mean`` (mean of ``(v - R)^2``).
    """
    mask = _check_tokens({"values": values, "old_values": old_values, "returns": returns}, mask)
    clip = check_number("clip", clip, gt=0.0, allow_none=True)
    agg = check_choice("agg", agg, AGGS)
    _check_normalizer(normalizer)
    return dispatch(
        "value_loss",
        "value_loss:value_loss_triton",
        _ref.value_loss,
        values,
        old_values,
        returns,
        mask,
        clip=clip,
        agg=agg,
        normalizer=normalizer,
    )


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k1", mask=None) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference model.

    Args:
        logprobs, ref_logprobs: float tensors of one shape (any shape); both receive gradients.
        kind: ``"k1"`` (``d``), ``"abs"`` (``|d|``), ``"k2"`` (``d^2 / 2``) or ``"k3"``
            (``exp(-d) + d - 1``, with ``d`` clamped to [-20, 20] before the exp and the result to
            [-10, 10], as verl/OpenRLHF), where ``d = logprobs - ref_logprobs``.
        mask: optional bool/0-1 integer tensor of the same shape; masked positions give 0 and a zero gradient.

    Returns: float32 tensor (float64 for float64 inputs) of the inputs' shape.
    """
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    check_choice("kind", kind, KL_KINDS)
    if mask is not None:
        mask = check_mask("mask", mask, logprobs.shape)
    check_same_device({"logprobs": logprobs, "ref_logprobs": ref_logprobs, "mask": mask})
    return dispatch("kl_penalty", "kl:kl_penalty_triton", _ref.kl_penalty, logprobs, ref_logprobs, kind=kind, mask=mask)
