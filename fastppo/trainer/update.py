"""The PPO update: epochs x mini-batches (one optimizer step each) x micro-batches (gradient accumulation).

Each micro-batch's losses are divided by the *mini-batch's* count (valid tokens for ``token-mean``,
sequences for the seq modes: the ``normalizer`` of :func:`fastppo.policy_loss`), so the accumulated
gradient is that of the whole mini-batch whatever the micro-batch size. Policy and critic have their
own AdamW, learning rate and gradient clipping; during the critic's warm-up only the critic steps.

Under torchrun the count is the mini-batch's over all ranks, divided by the world size (DDP and FSDP2
average the ranks' gradients), so the step is that of the global mini-batch; the early stop on
``target_kl`` and the non-finite check decide on sums over all ranks, so every rank takes the same path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from fastppo.losses import kl_penalty, policy_loss, value_loss
from fastppo.reference.common import masked_sum
from fastppo.trainer.distributed import SINGLE, Dist, local_tensor, no_grad_sync
from fastppo.trainer.metrics import Mean
from fastppo.trainer.phases import phase


class NonFiniteError(FloatingPointError):
    """A loss, reward or gradient became NaN or infinite: the run stops, naming the step and the quantity."""


_FUSED_DEVICES = ("cpu", "cuda")  # where torch (>= 2.4) has the fused AdamW kernel


def make_optimizer(params, lr: float, ppo) -> torch.optim.AdamW:
    """AdamW over ``params`` with the betas, eps and weight decay of ``ppo`` (a :class:`PPOAlgoConfig`).

    Fused (one kernel over all parameters instead of a dozen ops per tensor, the same update up to
    rounding) when every parameter is a floating-point tensor on the CPU or a CUDA device; torch's
    default implementation otherwise."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(ppo.adam_beta1, ppo.adam_beta2),
        eps=ppo.adam_eps,
        weight_decay=ppo.weight_decay,
        fused=fused or None,
    )


def make_scheduler(optimizer, *, kind: str, warmup_steps: int, total_steps: int):
    """Per optimizer step: linear warm-up ``(s + 1) / warmup_steps``, then constant or linear decay to 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if kind == "linear":
            return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Learner:
    """What the update trains: the policy's :class:`LogProbHead` and optional critic, with their
    optimizers and schedulers (the checkpoint saves these)."""

    policy: torch.nn.Module
    policy_optimizer: torch.optim.Optimizer
    policy_scheduler: object
    critic: torch.nn.Module | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    critic_scheduler: object = None


def normalizer(completion_mask: torch.Tensor, agg: str, dist: Dist = SINGLE) -> torch.Tensor:
    """The mini-batch count the losses are divided by: valid tokens (``token-mean``) or sequences with a
    valid token (seq modes), at least 1; under torchrun, the count over all ranks / the world size."""
    return dist.sum(_count(completion_mask, agg)).clamp_min(1) / dist.world_size


def ppo_update(
    exp,
    learner: Learner,
    config,
    *,
    rng: torch.Generator,
    meter: Mean,
    step: int = 0,
    train_policy: bool = True,
    kl_coef: float = 0.0,
    autocast=contextlib.nullcontext,
    dist: Dist = SINGLE,
) -> None:
    """Run ``ppo_epochs`` passes over the :class:`Experience` ``exp``; metrics go into ``meter``.

    ``config``: the :class:`PPOConfig`; ``rng``: the CPU generator of the mini-batch permutations;
    ``train_policy``: False during the critic warm-up; ``kl_coef``: the weight of the KL loss term when
    ``kl_mode == "loss"``; ``autocast``: a context factory around the forwards (bf16 on CUDA);
    ``dist``: the run's process group (``exp`` is then this rank's share of the batch).
    """
    p, B = config.ppo, len(exp)
    mb = config.minibatch_size // dist.world_size
    micro = config.ppo.micro_batch_size or mb
    device = exp.sequences.device
    if exp.live and micro < B:  # a kept graph is freed by its first backward: one micro-batch may use it
        raise ValueError(f"kept forwards (keep_first_forward) need one micro-batch of the whole batch {B}, not {micro}")
    for epoch in range(p.ppo_epochs):
        perm = torch.randperm(B, generator=rng).to(device)
        for k, start in enumerate(range(0, B, mb)):
            rows = perm[start : start + mb]
            mask = exp.completion_mask[rows]
            norm, n_tok = normalizer(mask, p.loss_agg, dist), normalizer(mask, "token-mean", dist)
            sums = torch.zeros(3, device=device)  # policy loss, value loss, approx_kl token-sum
            for opt in (learner.policy_optimizer, learner.critic_optimizer):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            widths = exp.widths([rows[i : i + micro] for i in range(0, mb, micro)])  # one host read
            for i, width in zip(range(0, mb, micro), widths):
                part = exp.select(rows[i : i + micro], width)
                with _grad_sync(learner, last=i + micro >= mb):
                    sums += _micro_step(part, learner, config, norm, n_tok, meter, train_policy, kl_coef, autocast)
            sums = dist.sum(sums) / dist.world_size  # token-sums over norm's scale: the same on every rank
            norms = _clip_gradients(learner, p.max_grad_norm, train_policy)
            # checked before the optimizers step: a non-finite loss or gradient never reaches the weights
            _check_finite(step, epoch, k, {"policy_loss": sums[0], "value_loss": sums[1], **norms})
            _step_optimizers(learner, train_policy)
            for name, value in norms.items():
                meter.add(name, value)
            exp = exp.without_live() if exp.live else exp  # used (and freed) by this mini-batch's backward
            if p.target_kl is not None and float(sums[2] / n_tok) > p.target_kl:
                return


def _micro_step(part, learner, config, norm, n_tok, meter, train_policy, kl_coef, autocast) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its [policy loss, value loss, approx_kl] token-sums."""
    out = torch.zeros(3, device=part.sequences.device)
    if train_policy:
        with phase("update_actor"):
            out[0], out[2] = _policy_micro_step(part, learner, config, norm, n_tok, meter, kl_coef, autocast)
    if learner.critic is not None:
        with phase("update_critic"):
            out[1] = _critic_micro_step(part, learner, config, norm, meter, autocast)
    return out


def _policy_micro_step(part, learner, config, norm, n_tok, meter, kl_coef, autocast):
    """The policy's forward and backward; returns its (policy loss, approx_kl) token-sums."""
    p, m = config.ppo, part.completion_mask
    n = m.sum().float()
    if part.live_logprobs is not None:  # prepare ran this forward (keep_first_forward)
        lp, ent = part.live_logprobs, part.live_entropy
    else:
        with autocast():
            lp, ent = learner.policy(
                part.sequences,
                part.attention_mask,
                part.prompt_length,
                completion_mask=m,
                temperature=config.rollout.temperature,
                entropy=p.ent_coef > 0,
            )
    pg, st = policy_loss(
        lp,
        part.logprobs,
        part.advantages,
        m,
        clip_low=p.clip_low,
        clip_high=p.clip_high,
        dual_clip=p.dual_clip,
        agg=p.loss_agg,
        normalizer=norm,
    )
    loss = pg
    if p.ent_coef > 0:
        loss = loss - p.ent_coef * masked_sum(ent, m) / n_tok
    if config.kl.kl_mode == "loss" and part.ref_logprobs is not None and kl_coef > 0:
        kl = kl_penalty(lp, part.ref_logprobs, kind=config.kl.kl_estimator, mask=m)
        loss = loss + kl_coef * masked_sum(kl, m) / n_tok
    loss.backward()
    meter.add_sum("policy_loss", pg.detach() * norm, _count(m, p.loss_agg))
    for name in ("clip_frac", "approx_kl"):
        meter.add(name, st[name], n)
    meter.max("ratio_max", st["ratio_max"])
    return pg.detach() * norm, st["approx_kl"] * n


def _critic_micro_step(part, learner, config, norm, meter, autocast):
    """The critic's forward and backward; returns its value-loss token-sum."""
    p, m = config.ppo, part.completion_mask
    n = m.sum().float()
    if part.live_values is not None:  # prepare ran this forward (keep_first_forward)
        values = part.live_values
    else:
        with autocast():
            values = learner.critic(part.sequences, part.attention_mask, part.prompt_length)
    vl, vst = value_loss(
        values, part.values, part.returns, m, clip=config.critic.vf_clip, agg=p.loss_agg, normalizer=norm
    )
    (config.critic.vf_coef * vl).backward()
    meter.add_sum("value_loss", vl.detach() * norm, _count(m, p.loss_agg))
    meter.add("value_clip_frac", vst["clip_frac"], n)
    return vl.detach() * norm


@contextlib.contextmanager
def _grad_sync(learner: Learner, last: bool):
    """Under torchrun, reduce the gradients over ranks only in a mini-batch's last micro-batch."""
    with contextlib.ExitStack() as stack:
        for module in (learner.policy, learner.critic):
            if module is not None:
                stack.enter_context(no_grad_sync(module, last))
        yield


def _count(mask: torch.Tensor, agg: str) -> torch.Tensor:
    m = mask.bool()
    return (m.sum() if agg == "token-mean" else m.any(-1).sum()).float()


def _pairs(learner: Learner, train_policy: bool):
    """(metric name, optimizer, scheduler) of each model that steps now."""
    out = []
    if train_policy:
        out.append(("grad_norm", learner.policy_optimizer, learner.policy_scheduler))
    if learner.critic is not None and learner.critic_optimizer is not None:
        out.append(("critic_grad_norm", learner.critic_optimizer, learner.critic_scheduler))
    return out


def _clip_gradients(learner: Learner, max_norm, train_policy: bool) -> dict:
    """Clip each model's gradient to ``max_norm`` (None: no clipping); ``{metric: norm before clipping}``."""
    return {  # a sharded model's norm is a DTensor over all ranks' shards: its full value
        name: local_tensor(_clip([q for g in opt.param_groups for q in g["params"]], max_norm))
        for name, opt, _ in _pairs(learner, train_policy)
    }


def _clip(params: list, max_norm):
    """``clip_grad_norm_``; without ``max_norm``, only the norm it computes (torch >= 2.6 has it on its own):
    clipping to infinity multiplies every gradient by 1, a pass over all of them that changes nothing."""
    if max_norm is None and hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)


def _step_optimizers(learner: Learner, train_policy: bool) -> None:
    for name, opt, sched in _pairs(learner, train_policy):
        with phase("update_actor" if name == "grad_norm" else "update_critic"):
            opt.step()
            sched.step()


def _check_finite(step: int, epoch: int, minibatch: int, values: dict) -> None:
    """One host read for all ``values`` (0-dim tensors); raise :class:`NonFiniteError` naming the first bad one."""
    flat = torch.stack([torch.as_tensor(v).reshape(()).float() for v in values.values()]).cpu().tolist()
    for name, v in zip(values, flat):
        if not math.isfinite(v):
            raise NonFiniteError(
                f"step {step + 1}, epoch {epoch + 1}, mini-batch {minibatch + 1}: {name} is {v}; stopping the run"
            )
