"""Per-token log-probabilities and entropy: the public functions.

* :func:`logprobs_and_entropy` from logits ``[..., V]`` (Triton kernel :mod:`fastppo.kernels.logprobs`,
  or the chunked PyTorch reference :mod:`fastppo.reference.logprobs`);
* :func:`linear_logprobs_and_entropy` from the last hidden states and the lm_head weight, without ever
  materializing the ``[N, V]`` logits (Triton kernel :mod:`fastppo.kernels.linear_logprobs`, or the
  chunked reference).

Both return float32 (float64 for float64 inputs) and are differentiable through both outputs.
"""

from __future__ import annotations

import torch

from fastppo._checks import (
    check_bool,
    check_float,
    check_int,
    check_labels,
    check_number,
    check_same_device,
    check_shape,
)
from fastppo._dispatch import dispatch
from fastppo._layout import rows3d
from fastppo.reference.logprobs import linear_logprobs_and_entropy_torch, logprobs_and_entropy_torch


def _options(temperature, ignore_index, entropy) -> dict:
    """The options both functions share, validated and as plain Python values."""
    return dict(
        temperature=check_number("temperature", temperature, gt=0),
        ignore_index=check_number("ignore_index", ignore_index, integer=True),
        entropy=check_bool("entropy", entropy),
    )


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label and entropy of each row of ``logits / temperature``.

    Args:
        logits: ``[..., V]`` float16/bfloat16/float32/float64, any strides (``logits[:, :-1]`` is read
            in place, without a copy).
        labels: ``[...]`` (= ``logits.shape[:-1]``) integer, in ``[0, V)`` or equal to ``ignore_index``.
        temperature: ``z = logits / temperature`` (> 0).
        ignore_index: label value whose positions give 0 for both outputs and get zero gradient.
        entropy: when False, the entropy is neither computed nor returned (``None``).
        inplace_backward: opt-in memory saving: the backward writes the gradient into the logits'
            own buffer instead of a fresh ``[..., V]`` one. The logits' values are destroyed, so they
            must not be used after the backward (autograd raises if another op saved them for its
            own backward and runs after ours). Both backends honour it (an expanded tensor whose rows
            share memory falls back to a fresh buffer). It saves memory only when ``logits`` is the
            producer's whole output: for a slice such as ``logits[:, :-1]``, autograd's slice backward
            allocates a full-size gradient anyway (slice the hidden states before the lm_head instead).

    Float64 logits (gradcheck, ground truths) always take the reference path: the kernel computes in
    float32. With the Triton backend, rows are bit-identical whatever else is in the batch.

    Returns:
        ``(logprobs, entropy)``, each ``[...]`` float32 (float64 for float64 logits):
        ``logprobs = log_softmax(z)[label]``, ``entropy = -sum softmax(z) * log_softmax(z)``;
        ``entropy`` is None when ``entropy=False``. Gradients flow from both.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_int("labels", labels)
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device({"logits": logits, "labels": labels})
    opts = _options(temperature, ignore_index, entropy)
    opts["inplace_backward"] = check_bool("inplace_backward", inplace_backward)
    check_labels(labels, logits.shape[-1], opts["ignore_index"])

    lead = logits.shape[:-1]
    if rows3d(logits) is None:  # rows not addressable by an [O, T, V] view (rare): one copy
        logits = logits.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # [N]: small, the kernels read it densely
    lp, ent = dispatch(
        "logprobs_and_entropy",
        "logprobs:logprobs_and_entropy_triton",
        logprobs_and_entropy_torch,
        logits,
        labels1d,
        **opts,
    )
    return lp.view(lead), (None if ent is None else ent.view(lead))


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_and_entropy` of ``hidden @ weight.T + bias`` without materializing those logits.

    Args:
        hidden: ``[..., H]`` float (the last hidden states), any strides.
        weight: ``[V, H]`` float (the lm_head weight).
        labels: ``[...]`` (= ``hidden.shape[:-1]``) integer, in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` float or None.
        temperature, ignore_index, entropy: as in :func:`logprobs_and_entropy`.

    Returns:
        ``(logprobs, entropy)`` ``[...]`` float32 (float64 if an input is float64), entropy None when
        ``entropy=False``; differentiable with respect to ``hidden``, ``weight`` and ``bias``. The
        reference path holds at most one chunk of ``[rows, V]`` float32 at a time.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got {tuple(weight.shape)}"
        )
    V = weight.shape[0]
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (V,), "weight.shape[:1]")
    check_int("labels", labels)
    check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device({"hidden": hidden, "weight": weight, "bias": bias, "labels": labels})
    opts = _options(temperature, ignore_index, entropy)
    check_labels(labels, V, opts["ignore_index"])

    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    lp, ent = dispatch(
        "linear_logprobs_and_entropy",
        "linear_logprobs:linear_logprobs_and_entropy_triton",
        linear_logprobs_and_entropy_torch,
        hidden2d,
        weight,
        labels1d,
        bias,
        **opts,
    )
    return lp.view(lead), (None if ent is None else ent.view(lead))
