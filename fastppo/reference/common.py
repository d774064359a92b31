"""Masked reductions shared by the reference ops."""

from __future__ import annotations

import torch


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fastppo's ops compute and return float32, or float64 when an input is float64 (gradcheck)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is true (``torch.where``, so NaN/inf outside the mask never leak)."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over valid positions: ``sum(x * mask) / max(sum(mask), 1)``.

    ``x`` any float tensor, ``mask`` bool of the same shape (validated by :func:`fastppo.masked_mean`).
    ``dim=None`` reduces everything. A reduction with no valid position gives 0, not NaN.
    """
    dtype = result_dtype(x)
    num = masked_sum(x.to(dtype), mask, dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    return num / den.clamp_min(1).to(dtype)
