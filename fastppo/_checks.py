"""Input validation shared by the public functions.

Every error names the offending argument, so that bad input fails here with a clear message
instead of as a NaN, a crash deep inside Triton, or a wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    """All tensors in ``{name: tensor}`` share the shape of the first one."""
    items = [(k, v) for k, v in pairs.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        check_shape(name, t, ref.shape, ref_name)


def check_same_device(pairs: dict) -> None:
    items = [(k, v) for k, v in pairs.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share one device"
            )


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive(name: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


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
