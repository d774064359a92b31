"""Data-parallel training under ``torchrun``: the process group, the wrappers, global statistics.

``torchrun --nproc-per-node N -m fastppo train ...`` starts N copies of the same trainer; each finds
the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets and joins the process group
(NCCL on CUDA, one device per local rank; gloo on CPU). Without them nothing here runs:
:data:`SINGLE` answers every collective as a no-op.

Design:

* **Data.** A step's ``rollout_batch_size`` prompts are global: every rank draws the same prompt
  indices (one sampler, one seed) and rolls out its contiguous share. Batch sizes are global too
  (``num_minibatches`` and ``micro_batch_size`` must divide each rank's share), so every rank runs the
  same number of mini- and micro-batches whatever its completions' lengths: no rank waits on a
  collective the others skip.
* **Models.** ``parallelism='fsdp'``: the policy's :class:`LogProbHead` and the critic are sharded with
  FSDP2 (``fully_shard`` on each decoder layer, then on the whole module), so the head reads the full
  output-embedding weight inside its forward. ``'ddp'``: both are wrapped in
  ``DistributedDataParallel``. The reference and reward models are replicated (a full copy per rank)
  or sharded the same way (``reference_placement`` / ``reward_model_placement``).
* **Rollout.** Decoding on sharded weights would all-gather every layer for every token, and ranks
  whose completions stop at different lengths would hang in those collectives. Under FSDP each rank
  therefore generates with an unsharded **rollout replica** (:class:`RolloutReplica`), refreshed in
  place after each update by all-gathering the new shards (``copy_`` into the same storage, so the
  Generator's CUDA graphs stay valid). Memory: one more full copy of the policy's weights per rank,
  in their loaded dtype (2 bytes x parameters in bf16: 1 GB for a 0.5B model, 14 GB for 7B). Under
  DDP the policy is not sharded and generates itself.
* **Statistics.** Losses are divided by the mini-batch's *global* token (or sequence) count over the
  world size: DDP and FSDP average gradients over ranks, so the step is that of the whole global
  mini-batch. Advantage whitening, reward normalization, the adaptive KL controller and every logged
  metric are computed from sums and counts (or the gathered per-completion values) of all ranks,
  never from means of means.
* **Seeds.** Each rank's sampling and mini-batch generators start at ``seed + rank * RANK_SEED_STRIDE``
  (rank 0 draws exactly what a single process draws).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

RANK_SEED_STRIDE = 1_000_003


def torchrun_env() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets ``RANK``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Dist:
    """The process group of a run, or none (``Dist()``: world size 1, every collective a no-op).

    Collectives take and return tensors on the run's device (NCCL needs CUDA tensors)."""

    def __init__(self, enabled: bool = False):
        import torch.distributed as dist

        self.enabled = enabled and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.rank = dist.get_rank() if self.enabled else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (a new tensor)."""
        return self._reduce(t, "SUM")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "MAX")

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        t = t.detach().clone()
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    def any(self, flag: bool, device) -> bool:
        """Whether ``flag`` is true on any rank (a stop request must end every rank at the same step)."""
        if not self.enabled:
            return bool(flag)
        return bool(self.max(torch.tensor([float(flag)], device=device)).item())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' ``t`` concatenated along dim 0, in rank order; the ranks' lengths may differ."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (JSON-like), in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` a multiple of the world size)."""
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)


SINGLE = Dist()


def init_distributed(backend: str, device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (once per process); returns the :class:`Dist` and this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA run). Outside torchrun: ``(SINGLE, device)``."""
    import torch.distributed as dist

    if not torchrun_env() and not dist.is_initialized():
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        name = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        if name == "nccl" and device.type != "cuda":
            raise ValueError("backend='nccl' needs a CUDA device; use backend='gloo' (or 'auto') on the CPU")
        dist.init_process_group(name, device_id=device if name == "nccl" else None)
    return Dist(enabled=True), device


def check_world(config, world_size: int) -> None:
    """The global batch sizes of ``config`` split evenly over ``world_size`` ranks (else ValueError)."""
    r, p = config.rollout, config.ppo
    if r.rollout_batch_size % world_size:
        raise ValueError(
            f"rollout_batch_size={r.rollout_batch_size} (prompts per step, all ranks together) must be a "
            f"multiple of the world size {world_size}"
        )
    local = config.batch_size // world_size
    if local % p.num_minibatches:
        raise ValueError(
            f"num_minibatches={p.num_minibatches} must divide each rank's {local} completions per step "
            f"(batch {config.batch_size} / world size {world_size})"
        )
    micro = p.micro_batch_size
    if micro is not None and (local // p.num_minibatches) % micro:
        raise ValueError(
            f"micro_batch_size={micro} must divide each rank's mini-batch of {local // p.num_minibatches} "
            f"completions (batch {config.batch_size} / world size {world_size} / num_minibatches {p.num_minibatches})"
        )


# --------------------------------------------------------------------------------------------------
# wrapping
# --------------------------------------------------------------------------------------------------
def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside ``module``: the classes its Hugging Face models name in
    ``_no_split_modules`` (the unit FSDP shards one at a time)."""
    names = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def shard(module: nn.Module) -> nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer of ``module``, then on ``module`` itself (embeddings,
    final norm and lm_head: the head's forward is what unshards them). Returns ``module``, now an
    FSDP module whose parameters are DTensor shards."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(module)
    if not layers:
        raise ValueError(f"cannot shard {type(module).__name__}: no decoder layer named in _no_split_modules")
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def shard_reward_model(model: nn.Module) -> nn.Module:
    """FSDP2 on a sequence-classification reward model as :class:`fastppo.trainer.RewardModel` calls it:
    its body and its ``score`` head are each called on their own (not through the model's forward), so
    each is a unit of its own besides the decoder layers."""
    from torch.distributed.fsdp import fully_shard

    from fastppo.trainer.models import decoder_of

    shard(decoder_of(model))
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear):
        fully_shard(head)
    fully_shard(model)
    return model


def wrap(module: nn.Module, parallelism: str, device: torch.device) -> nn.Module:
    """``module`` sharded (``'fsdp'``) or in ``DistributedDataParallel`` (``'ddp'``)."""
    if parallelism == "fsdp":
        return shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (an FSDP2 module is its own)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def no_grad_sync(module: nn.Module, last: bool):
    """Skip the gradient reduction of a micro-batch that is not the mini-batch's last: the gradients
    accumulate locally and are reduced once (FSDP2 ``set_requires_gradient_sync``, DDP ``no_sync``)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if not last and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def local_tensor(t):
    """A DTensor's full value (a collective: every rank must call it), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class RolloutReplica:
    """An unsharded copy of the policy on this rank, for generation under FSDP (module docstring).

    ``RolloutReplica(policy)`` copies ``policy`` *before* it is sharded; :meth:`refresh` (a collective:
    every rank calls it) copies the current weights of the sharded ``source`` into it in place."""

    def __init__(self, policy: nn.Module):
        self.model = copy.deepcopy(policy).requires_grad_(False).eval()

    @torch.no_grad()
    def refresh(self, source: nn.Module) -> None:
        mine = dict(self.model.named_parameters())
        for name, p in source.named_parameters():
            mine[name].copy_(local_tensor(p.detach()))


# --------------------------------------------------------------------------------------------------
# global statistics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """:func:`fastppo.masked_whiten` with the mean and the unbiased variance over the valid positions of
    all ranks (two passes, as the one-process op: the variance is of the deviations from the global mean)."""
    if not dist.enabled:
        from fastppo.advantages import masked_whiten as local

        return local(x, mask)
    from fastppo.reference.common import masked_sum

    m = mask.bool()
    xd = x.double()
    first = dist.sum(torch.stack([m.sum().double(), masked_sum(xd, m)]))
    n, mean = first[0], first[1] / first[0].clamp_min(1)
    ss = dist.sum(masked_sum((xd - mean) ** 2, m))
    var = torch.where(n >= 2, ss / (n - 1).clamp_min(1), torch.zeros_like(ss))
    out = torch.where(m, (xd - mean) * torch.rsqrt(var + 1e-8), 0.0)
    return out if x.dtype == torch.float64 else out.float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean of ``x`` over the valid positions of all ranks (0 when none is valid); one process:
    :func:`fastppo.masked_mean`."""
    if not dist.enabled:
        from fastppo.advantages import masked_mean as local

        return local(x, mask)
    from fastppo.reference.common import masked_sum

    m = mask.bool()
    sums = dist.sum(torch.stack([masked_sum(x.float(), m), m.sum().float()]))
    return sums[0] / sums[1].clamp_min(1)
