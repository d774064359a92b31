"""Advantage estimators: multi-turn GAE, masked whitening, group (critic-free) advantages.

None of them is differentiable: advantages and returns are targets, computed under
``torch.no_grad()``, and the outputs never require grad.
"""

from __future__ import annotations

import torch

from fastppo._checks import (
    check_bool,
    check_choice,
    check_float,
    check_mask,
    check_number,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from fastppo._dispatch import dispatch
from fastppo.reference import advantages as ref
from fastppo.reference import common


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0):
    """Generalized advantage estimation with verl's multi-turn masking.

    Args:
        rewards: ``[B, T]`` float (fp16/bf16/fp32/fp64) token-level rewards.
        values: ``[B, T]`` float critic values.
        mask: ``[B, T]`` bool or 0/1 integer; False marks positions to *skip* (padding, or the
            tool/observation tokens inside a multi-turn response).
        gamma, lam: discount and GAE lambda, in ``[0, 1]``.

    Each row is processed from ``t = T-1`` down to 0 with ``nextvalue = lastgaelam = 0``; on a
    valid ``t``::

        delta = r[t] + gamma * nextvalue - v[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        adv[t] = lastgaelam;  nextvalue = v[t]

    and on a masked ``t`` nothing changes (``adv[t] = 0``): a masked position adds no reward and
    does not break the bootstrap chain. On right-padded data this is the classic TRL/OpenRLHF
    loop with rewards and values zeroed on the padding.

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` float32 (float64 when an input is float64), with
        ``returns = advantages + values`` on valid positions and both 0 on masked positions (NaN/inf
        there never leak). Not whitened: see :func:`masked_whiten`.

    CUDA tensors run one Triton launch (:mod:`fastppo.kernels.gae`); otherwise a loop-free PyTorch
    path (:func:`fastppo.reference.advantages.gae`). float64 inputs always take the PyTorch path
    (the kernel computes in float32).
    """
    check_float("rewards", rewards)
    check_float("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    check_same_shape({"rewards": rewards, "values": values})
    mask = check_mask("mask", mask, rewards.shape)
    check_same_device({"rewards": rewards, "values": values, "mask": mask})
    gamma = check_number("gamma", gamma, ge=0.0, le=1.0)
    lam = check_number("lam", lam, ge=0.0, le=1.0)
    return dispatch("gae", "gae:gae_forward", ref.gae, rewards, values, mask, gamma, lam)


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` over its valid positions (the whole tensor), as verl/TRL ``masked_whiten``.

    ``out = (x - mean) * rsqrt(var + 1e-8)`` with ``mean``, ``var`` over the positions where
    ``mask`` is true, ``var`` unbiased (``sum (x-mean)^2 / (n-1)``), taken as 0 when fewer than 2
    positions are valid (verl raises there). ``shift_mean=False`` adds ``mean`` back. Masked
    positions give 0. ``x`` any shape, float; ``mask`` bool/int of the same shape. Returns float32
    (float64 for a float64 ``x``). Not differentiable (an advantage transform).
    """
    mask = _check_masked(x, mask)
    shift_mean = check_bool("shift_mean", shift_mean)
    return dispatch("masked_whiten", None, ref.masked_whiten, x, mask, shift_mean)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over valid positions: ``sum(x * mask) / max(sum(mask), 1)``.

    ``x`` any float tensor, ``mask`` bool/int of the same shape; ``dim=None`` (everything), an int or
    a tuple of ints. A reduction with no valid position gives 0, not NaN (NaN/inf under the mask never
    leak). Differentiable with respect to ``x``. Returns float32 (float64 for a float64 ``x``).
    """
    mask = _check_masked(x, mask)
    return dispatch("masked_mean", None, common.masked_mean, x, mask, dim)


def _check_masked(x, mask) -> torch.Tensor:
    check_float("x", x)
    mask = check_mask("mask", mask, x.shape)
    check_same_device({"x": x, "mask": mask})
    return mask


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_size: int, *, kind: str = "grpo", scale: bool | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free advantages: each sample's score against its prompt group.

    Args:
        scores: ``[N]`` sequence-level scores (float, int or bool), ``N`` a multiple of
            ``group_size``; consecutive samples ``[g*G, (g+1)*G)`` are the answers to one prompt.
        group_size: ``G``, answers per prompt.
        kind: ``"grpo"``: ``s - mean_g``.  ``"rloo"``: ``s - (sum_g - s) / (G - 1)``, the mean of
            the *other* ``G-1`` samples as baseline (REINFORCE leave-one-out; equals
            ``G/(G-1) * (s - mean_g)``); needs ``G >= 2``.
        scale: divide by ``std_g + eps`` (unbiased group std of the scores, as TRL/verl).
            ``None`` (default) picks each method's standard form: True for grpo (GRPO; pass
            False for Dr. GRPO), False for rloo (verl and the RLOO paper do not scale; TRL's
            optional ``normalize_advantages`` whitens over the batch, i.e. ``masked_whiten``).
        eps: added to the std, ``> 0`` recommended (groups with equal scores have std 0).

    ``G = 1`` with grpo gives advantages 0 (a lone sample is its own baseline), not NaN.
    Returns ``[N]`` float32 (float64 for float64 scores).
    """
    check_tensor("scores", scores)
    if scores.dtype.is_complex:
        raise TypeError(f"scores must be a real tensor, got {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    check_choice("kind", kind, ("grpo", "rloo"))
    min_g = 2 if kind == "rloo" else 1
    group_size = check_number(f"group_size (kind={kind!r})", group_size, integer=True, ge=min_g)
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} elements, not a multiple of group_size={group_size}")
    scale = check_bool("scale", scale, allow_none=True)
    if scale is None:
        scale = kind == "grpo"
    eps = check_number("eps", eps, ge=0.0)
    return dispatch("group_advantages", None, ref.group_advantages, scores, group_size, kind, scale, eps)
