"""Memory-layout helpers shared by the PyTorch reference and the Triton launchers: how the rows of a
``[..., V]`` tensor are addressed without a copy, and when rows may share memory."""

from __future__ import annotations

import torch


def rows3d(x: torch.Tensor) -> torch.Tensor | None:
    """A view ``[O, T, V]`` of ``x [..., V]`` (rows in C order, unit column stride), or None if none exists.

    Row ``r`` of the flattened ``[N, V]`` lives at ``x3[r // T, r % T]``. A tensor with one row stride
    (``[N, V]``, or any contiguous one) gives ``O = 1``; the common ``logits[:, :-1]`` of a
    ``[B, L, V]`` tensor, which no single row stride describes, gives ``[B, L - 1, V]``. Both kernels
    and the chunked reference read the rows through this view, so neither copies the logits.
    """
    V = x.shape[-1]
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if V > 1 and x.stride(-1) != 1:
        return None
    try:
        return x.view(1, -1, V)
    except RuntimeError:
        pass
    try:
        return x.view(-1, x.shape[-2], V)
    except RuntimeError:
        return None


def overlapping_rows(x3: torch.Tensor) -> bool:
    """Whether rows of ``x3 [O, T, V]`` may share memory (an expanded tensor): writing in place would be wrong.

    Conservative: an unusual but disjoint layout (outer stride smaller than one outer slice) also
    answers True, and the in-place backward then falls back to a fresh buffer.
    """
    O, T, V = x3.shape
    so, st, _ = x3.stride()
    if T > 1 and st < V:
        return True
    extent = (T - 1) * st + V if T > 1 else V
    return O > 1 and so < extent
