"""Input validation shared by every public function: one validator for numbers and flags, one set of
tensor checks.

Every error names the offending argument, so that bad input fails here with a clear message
instead of as a NaN, a crash deep inside Triton, or a wrong answer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Python values: numbers, flags, choices
# --------------------------------------------------------------------------------------------------
def _is_bool(value) -> bool:
    # numpy's bool_ is not a Python bool (nor a numbers.Integral), but it is a flag all the same
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _scalar(name: str, value, *, integer: bool):
    """``value`` as a Python int/float: accepts Python and numpy real scalars and 0-dim real tensors
    (``numpy.float32(0.7)``, ``torch.tensor(0.7)``); bools are flags, never numbers."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be {kind} or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex() or (integer and value.dtype.is_floating_point):
            real = "an integer" if integer else "a real number"
            raise TypeError(f"{name} must be {real} tensor, got {value.dtype}")
        return value.item()  # a host read: a sync for a CUDA tensor, once per call
    wanted = numbers.Integral if integer else numbers.Real
    if _is_bool(value) or not isinstance(value, wanted):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return int(value) if integer else float(value)


def _bounds(gt, ge, lt, le) -> str:
    low = f"({gt}" if gt is not None else (f"[{ge}" if ge is not None else None)
    high = f"{lt})" if lt is not None else (f"{le}]" if le is not None else None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"> {gt}" if gt is not None else f">= {ge}"
    if high:
        return f"< {lt}" if lt is not None else f"<= {le}"
    return "finite"


def check_number(
    name: str,
    value,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
):
    """Validate a real number (an int with ``integer=True``) and return it as a Python ``float``/``int``.

    Accepts Python and numpy scalars and 0-dim real tensors; rejects bools, NaN and infinities.
    ``gt``/``ge``/``lt``/``le`` are the strict/inclusive bounds. ``None`` passes (and is returned)
    only with ``allow_none``. Raises ``TypeError`` for a value of the wrong kind, ``ValueError`` for
    one out of bounds, naming ``name`` in both.
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got None")
    x = _scalar(name, value, integer=integer)
    ok = math.isfinite(x)
    ok = ok and (gt is None or x > gt) and (ge is None or x >= ge)
    ok = ok and (lt is None or x < lt) and (le is None or x <= le)
    if not ok:
        raise ValueError(f"{name} must be {_bounds(gt, ge, lt, le)}, got {value!r}")
    return x


def check_bool(name: str, value, *, allow_none: bool = False) -> bool | None:
    """A flag: ``True`` or ``False`` (numpy's bool too), ``None`` only with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {type(value).__name__}")
    return bool(value)


def check_choice(name: str, value, choices: Iterable):
    """``value`` is one of ``choices`` (compared with ``==``); returns it."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if type(t).__name__ == "DTensor":  # by name: no torch.distributed import on the hot path
        # a shard passed as if it were the tensor would give a wrong answer of the right shape
        raise TypeError(
            f"{name} is a DTensor (an FSDP2 shard, local shape {tuple(t.to_local().shape)} of {tuple(t.shape)}): "
            "read the weight inside the forward of the sharded module, where FSDP2 has gathered it (as "
            "fastppo.trainer.LogProbHead does), or pass .full_tensor()"
        )
    return t


def check_float(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


def check_int(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """A mask is a bool or integer (0/1) tensor of exactly ``shape``; returns it as bool."""
    check_tensor(name, mask)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
    check_shape(name, mask, shape)
    return mask if mask.dtype == torch.bool else mask != 0


def check_shape(name: str, t: torch.Tensor, shape: Iterable[int], ref: str = "") -> None:
    shape = torch.Size(shape)
    if t.shape != shape:
        other = f" (the shape of {ref})" if ref else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{other}, got {tuple(t.shape)}")


def check_same_shape(pairs: dict) -> None:
    """All tensors in ``{name: tensor}`` (``None`` entries skipped) share one shape.

    The error blames the tensor that differs from the shape most of them share (the first one on a
    tie): a ``[B, T, 1]`` value-head output beside ``[B, T]`` old values, returns and mask names
    ``values``, not ``old_values``.
    """
    items = [(k, v) for k, v in pairs.items() if v is not None]
    shapes = [t.shape for _, t in items]
    ref = max(shapes, key=lambda s: (shapes.count(s), -shapes.index(s)))
    holders = [k for k, t in items if t.shape == ref]
    for name, t in items:
        if t.shape != ref:
            hint = ""
            if t.dim() == len(ref) + 1 and t.shape[-1] == 1 and t.shape[:-1] == ref:
                hint = f"; squeeze its last dimension ({name}.squeeze(-1))"
            refs = ", ".join(holders)
            raise ValueError(f"{name} must have shape {tuple(ref)} (the shape of {refs}), got {tuple(t.shape)}{hint}")


def check_same_device(pairs: dict) -> None:
    items = [(k, v) for k, v in pairs.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share one device"
            )


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels are integers in ``[0, vocab_size)`` or ``ignore_index``.

    The range check reads one boolean back from the device: a small synchronisation, paid so that
    an out-of-range label is an error rather than an out-of-bounds read or a silent wrong log-prob.
    """
    check_int("labels", labels)
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) (the vocabulary size, logits.shape[-1]) or equal "
            f"ignore_index={ignore_index}; found {first}"
        )
