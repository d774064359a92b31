"""Shared pieces of the elementwise ``[rows, T]`` kernels (policy loss, value loss, KL) and their launchers.

A launcher views each ``[..., T]`` input as ``[rows, T]`` (:func:`rows2d`, a view for any 2-D strides)
and passes its two strides (:func:`row_strides`); the grid is ``(rows, cdiv(T, BLOCK))`` and a
program handles one block of one row (:func:`row_block`).
"""

from __future__ import annotations

import torch
import triton.language as tl

from fastppo.kernels._jit import jit


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` as ``[rows, T]``: a view (no copy) for 0/1/2-D tensors, any strides, and mergeable leading dims."""
    return x.reshape(1, 1) if x.dim() == 0 else x.reshape(-1, x.shape[-1])


def row_strides(*xs: torch.Tensor) -> tuple[int, ...]:
    """The row and column stride of each ``[rows, T]`` tensor, in order: the kernels' ``s_<x>_r, s_<x>_t``."""
    return tuple(s for x in xs for s in (x.stride(0), x.stride(1)))


@jit
def row_block(T, BLOCK: tl.constexpr):
    """This program's ``(row, block, cols, in_row)``: row ``program_id(0)`` (int64: ``row * stride``
    can pass 2^31), block ``program_id(1)``, its column indices (int64) and their ``< T`` mask."""
    row = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    cols = tb * BLOCK + tl.arange(0, BLOCK)
    return row, tb, cols.to(tl.int64), cols < T


@jit
def load_valid(X, row, c, s_r, s_t, in_row, valid):
    """``X[row, c]`` as float32 where ``valid``, 0 elsewhere. The load is masked by the row bound only
    (a mask that depends on data cannot be vectorised); a NaN/inf stored at a masked position is
    replaced by 0, so it cannot leak."""
    x = tl.load(X + row * s_r + c * s_t, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(valid, x, 0.0)


@jit
def flag(value, BLOCK: tl.constexpr):
    """A runtime int flag as a ``[BLOCK]`` bool: Triton's interpreter needs a tensor to join a mask."""
    return tl.full((BLOCK,), value, tl.int32) != 0
