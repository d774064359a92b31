"""What a benchmark is made of: a :class:`Case` (one op at one shape and dtype, its inputs and the
work one call does) and its :class:`Impl` s (ours and the baselines), timed per pass.

Passes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (forward with autograd, then
``torch.autograd.grad`` of the case's objective with respect to its ``grads`` inputs: not
``backward()``, which would copy an in-place gradient out of its buffer into a leaf's ``.grad``).
The backward alone is not timed apart: it is the difference of the two.

Work per call and units: ``"GB/s"`` counts the bytes a memory-bound op cannot avoid (its inputs read
once and its outputs written once; each case's docstring says which), put against the copy peak;
``"TFLOP/s"`` counts the useful flops, put against the matmul peak of the dtype; ``"tok/s"``
counts generated tokens and has no peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastppo.bench.timing import TimerSettings

PASSES = ("fwd", "fwd+bwd")
UNIT_SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12, "tok/s": 1.0}


@dataclass(frozen=True)
class BenchConfig:
    """What a run measures: the op modules build their cases from it."""

    device: str
    """``"cuda"`` or ``"cpu"``."""
    quick: bool
    """Small shapes (a smoke run: seconds per op on a CPU)."""
    compile: bool
    """Include the ``torch.compile`` peers (each compiles at its first call: tens of seconds on a CPU)."""

    def needs(self, *, cuda: bool = False, module: str | None = None, compile: bool = False) -> str | None:
        """Why an implementation with these needs cannot run in this run (None: it can)."""
        if cuda and self.device != "cuda":
            return "CUDA only"
        if compile and not self.compile:
            return "torch.compile off (--compile adds it)"
        if module is not None:
            from fastppo.bench.baselines import importable

            return importable(module)
        return None


@dataclass(frozen=True)
class Work:
    """What one call of a case does, for the achieved rate."""

    amount: float
    """Bytes (``GB/s``), flops (``TFLOP/s``) or tokens (``tok/s``) per call."""
    unit: str
    """``"GB/s"``, ``"TFLOP/s"`` or ``"tok/s"``."""
    peak: str | None
    """The key of :func:`fastppo.bench.peaks.measure_peaks` the rate is put against (None: no peak)."""


@dataclass(frozen=True)
class Impl:
    """One implementation of a case's op."""

    name: str
    """Short name in the rows (``fastppo-torch``, ``trl``, ``verl``, ...)."""
    fn: Callable[[dict], tuple]
    """The forward from the case's inputs; returns a tuple of outputs (entries may be None)."""
    source: str
    """Where the code comes from (project, file, version; or fastppo's path)."""
    baseline: bool
    """A peer: every row reports its speed-up over each baseline of its group."""
    skip: str | None = None
    """Why it cannot run here (CUDA only, not importable, compile off); None if it can."""
    fresh_inputs: bool = False
    """It writes into its inputs (an in-place backward): it gets inputs of its own."""
    passes: tuple[str, ...] | None = None
    """The passes it runs (None: all of the case's)."""


@dataclass
class Case:
    """One op at one shape and dtype on one device, with its implementations."""

    op: str
    """The op's name (``logprobs``, ``policy_loss``, ``generate``, ...)."""
    shape: str
    """The shape, as ``"B=64 T=1024"``."""
    dtype: str
    """The inputs' dtype (``"bfloat16"``, ``"float32"``)."""
    device: str
    """``"cuda"`` or ``"cpu"``."""
    make_inputs: Callable[[], dict]
    """Builds the inputs on ``device`` (tensors in ``grads`` require grad)."""
    impls: list[Impl]
    """Ours and the baselines."""
    work: Callable[[dict, str], Work]
    """``work(inputs, pass)``: what one call does."""
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    """The passes timed."""
    grads: tuple[str, ...] = ()
    """Inputs differentiated in ``fwd+bwd``."""
    objective: Callable[[tuple], torch.Tensor] | None = None
    """The scalar differentiated in ``fwd+bwd``; None: the sum of every tensor output's sum."""
    compared: int = 1
    """How many leading outputs are compared with the reference implementation's."""
    valid: str | None = None
    """The key of a bool input mask: outputs of its shape are compared only where it is true."""
    reference: str | None = "fastppo-torch"
    """The implementation the others are checked against (None: no check)."""
    timer: TimerSettings | None = None
    """Overrides the run's timer settings (slow calls such as ``generate``)."""
    meta: dict = field(default_factory=dict)
    """What the op module's row derivation needs (``generate``: the rollout state)."""
    _inputs: dict | None = field(default=None, repr=False)

    def inputs(self, fresh: bool = False) -> dict:
        """The inputs, made once and shared by the implementations (``fresh``: a new set)."""
        if fresh:
            return self.make_inputs()
        if self._inputs is None:
            self._inputs = self.make_inputs()
        return self._inputs

    def release(self) -> None:
        """Drop the inputs (the next case's may not fit beside them)."""
        self._inputs = None

    def call(self, impl: Impl, pass_: str) -> Callable[[], object]:
        """The zero-argument callable that runs ``impl`` for one ``pass_``."""
        x = self.inputs(fresh=impl.fresh_inputs)
        if pass_ == "fwd":

            def fwd():
                with torch.no_grad():
                    return impl.fn(x)

            return fwd
        params = [x[k] for k in self.grads]
        objective = self.objective or _sum_outputs
        if pass_ == "fwd+bwd":
            return lambda: torch.autograd.grad(objective(impl.fn(x)), params)
        raise ValueError(f"pass must be 'fwd' or 'fwd+bwd' here, got {pass_!r}")


def _sum_outputs(outputs: tuple) -> torch.Tensor:
    return sum(o.sum() for o in outputs if isinstance(o, torch.Tensor))


def max_abs_diff(outputs: tuple, reference: tuple, n: int, valid: torch.Tensor | None) -> float:
    """Largest ``|output - reference|`` over the first ``n`` outputs both have (float64).

    An output that is a scalar where the reference is a tensor (a summed loss) is compared with the
    reference's sum; tensors of ``valid``'s shape only where ``valid`` is true.
    """
    worst = 0.0
    for out, ref in list(zip(outputs, reference))[:n]:
        if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
            continue
        out, ref = out.detach().double(), ref.detach().double()
        if out.dim() == 0 and ref.dim() > 0:
            ref = ref.sum()
        if valid is not None and ref.shape == valid.shape:
            out, ref = out[valid], ref[valid]
        if out.shape != ref.shape:
            continue
        if out.numel():
            worst = max(worst, float((out - ref).abs().max()))
    return worst


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)
