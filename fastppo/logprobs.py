"""Per-token log-probabilities and entropy: the public functions.

* :func:`logprobs_and_entropy` from logits ``[..., V]`` (Triton kernel :mod:`fastppo.kernels.logprobs`,
  or the chunked PyTorch reference :mod:`fastppo.reference.logprobs`);
* :func:`linear_logprobs_and_entropy` from the last hidden states and the lm_head weight, without ever
  materializing the ``[N, V]`` logits (Triton kernel :mod:`fastppo.kernels.linear_logprobs`, or the
  chunked reference).

Both return float32 (float64 for float64 inputs) and are differentiable through both outputs.
"""

from __future__ import annotations

import math

import torch

from fastppo._backend import use_triton
from fastppo._checks import check_float, check_int, check_labels, check_same_device, check_shape, check_tensor
from fastppo._layout import rows3d
from fastppo.reference.logprobs import linear_logprobs_and_entropy_torch, logprobs_and_entropy_torch


def _check_options(temperature, ignore_index, entropy) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(entropy, bool):
        raise TypeError(f"entropy must be a bool, got {type(entropy).__name__}")


def _check_labels_tensor(labels: torch.Tensor, lead: torch.Size, ref: str) -> None:
    check_tensor("labels", labels)
    check_int("labels", labels)
    check_shape("labels", labels, lead, ref)


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
    _check_labels_tensor(labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device({"logits": logits, "labels": labels})
    _check_options(temperature, ignore_index, entropy)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    V = logits.shape[-1]
    check_labels(labels, V, ignore_index)

    lead = logits.shape[:-1]
    if logits.numel() == 0:  # no rows: empty outputs, still attached to the graph
        lp = logits.sum(-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        return lp, (lp.clone() if entropy else None)
    if rows3d(logits) is None:  # rows not addressable by an [O, T, V] view (rare): one copy
        logits = logits.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # [N]: small, the kernels read it densely
    opts = dict(temperature=temperature, ignore_index=ignore_index, entropy=entropy, inplace_backward=inplace_backward)
    # float64 (gradcheck, the tests' ground truth) stays on the reference: the kernels compute in float32.
    if logits.dtype != torch.float64 and use_triton(logits, labels):
        from fastppo.kernels.logprobs import logprobs_and_entropy_triton

        lp, ent = logprobs_and_entropy_triton(logits, labels1d, **opts)
    else:
        lp, ent = logprobs_and_entropy_torch(logits, labels1d, **opts)
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
    _check_labels_tensor(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device({"hidden": hidden, "weight": weight, "bias": bias, "labels": labels})
    _check_options(temperature, ignore_index, entropy)
    check_labels(labels, V, ignore_index)

    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    opts = dict(temperature=temperature, ignore_index=ignore_index, entropy=entropy)
    f64 = any(t is not None and t.dtype == torch.float64 for t in (hidden, weight, bias))
    if not f64 and use_triton(hidden, weight):
        # Written separately; an ImportError here (module not there yet) surfaces only on this path.
        from fastppo.kernels.linear_logprobs import linear_logprobs_and_entropy_triton

        lp, ent = linear_logprobs_and_entropy_triton(hidden2d, weight, labels1d, bias, **opts)
    else:
        lp, ent = linear_logprobs_and_entropy_torch(hidden2d, weight, labels1d, bias, **opts)
    return lp.view(lead), (None if ent is None else ent.view(lead))
