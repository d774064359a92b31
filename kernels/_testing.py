"""Hooks into the kernel launchers for tests and debugging, scoped by context managers.

    with record_launches() as launches:
        lp, ent = fastppo.logprobs_and_entropy(logits, labels)
        lp.sum().backward()
    launches["fwd"]["COMPUTE_ENTROPY"], launches["bwd"]["COMPUTE_ENTROPY"]  # which variants ran

    with launch_overrides(splits=3, vocab_chunk=256):
        ...  # the fused linear kernels split the vocabulary 3 ways and walk it in chunks of 256 columns

``launches[name]`` holds the constexprs and launch configuration of the latest launch of that kernel
(names per op: ``"fwd"``, ``"bwd"``). An op reads the hooks once, where its forward runs
(:func:`current_hooks`), and hands them to its backward: autograd runs the backward of CUDA tensors on
its own device thread, which does not see the caller's context variables.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

from fastppo._checks import check_number


@dataclasses.dataclass(frozen=True)
class LaunchHooks:
    """What the active context managers ask of a launch.

    record: the dict of the innermost active :func:`record_launches`, None outside one.
    splits: vocabulary splits of the fused linear forward (None: the launcher's rule).
    vocab_chunk: columns per chunk of the fused linear backward (None: the launcher's rule).
    """

    record: dict | None = None
    splits: int | None = None
    vocab_chunk: int | None = None

    def note(self, kernel: str, **info) -> None:
        """Record ``info`` as the latest launch of ``kernel`` (nothing outside :func:`record_launches`)."""
        if self.record is not None:
            self.record[kernel] = info


NO_HOOKS = LaunchHooks()
_HOOKS: contextvars.ContextVar[LaunchHooks] = contextvars.ContextVar("fastppo_launch_hooks", default=NO_HOOKS)


def current_hooks() -> LaunchHooks:
    """The hooks of the calling context (:data:`NO_HOOKS` outside every context manager here)."""
    return _HOOKS.get()


@contextlib.contextmanager
def _hooks(**changes):
    token = _HOOKS.set(dataclasses.replace(_HOOKS.get(), **changes))
    try:
        yield
    finally:
        _HOOKS.reset(token)


@contextlib.contextmanager
def record_launches():
    """Yield a dict that the launchers fill, while the block runs, with their latest launch per kernel."""
    launches: dict[str, dict] = {}
    with _hooks(record=launches):
        yield launches


def launch_overrides(*, splits: int | None = None, vocab_chunk: int | None = None):
    """Force the fused linear kernels' vocabulary ``splits`` (forward) and ``vocab_chunk`` (backward,
    rounded up to a whole tile) while the block runs; None keeps the enclosing setting."""
    changes = {
        "splits": check_number("splits", splits, ge=1, integer=True, allow_none=True),
        "vocab_chunk": check_number("vocab_chunk", vocab_chunk, ge=1, integer=True, allow_none=True),
    }
    return _hooks(**{k: v for k, v in changes.items() if v is not None})
