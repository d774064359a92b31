"""Every metric the trainer logs, defined once: name, how it is computed, what it tells.

:data:`METRICS` is the single definition: ``metrics.jsonl`` holds exactly these keys per step (plus
``reward/<component>`` for a reward function that returns named components), and
:func:`markdown_table` renders it for the docs. Quantities of the update are accumulated over *every*
micro-batch of every mini-batch and epoch of the step with :class:`Mean` (token-weighted where the
quantity is per token), never read off the last batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metric:
    name: str
    formula: str
    doc: str


METRICS = [
    Metric("step", "trainer steps done", "one step = one rollout batch + its PPO update"),
    Metric(
        "reward_mean",
        "mean over completions of sum_t r_t",
        "the return the policy maximizes: shaped score minus the KL penalty in the reward",
    ),
    Metric("reward_std", "std over completions of sum_t r_t", "spread of that return"),
    Metric("score_mean", "mean of the reward function's / model's scores", "the raw score, before shaping and KL"),
    Metric("score_std", "std of the raw scores", "0 means no learning signal for grpo/rloo"),
    Metric(
        "kl",
        "mean over completion tokens of k(log p_old - log p_ref)",
        "distance from the reference, with kl_estimator",
    ),
    Metric("kl_coef", "the KL coefficient used this step", "changes only with adaptive_kl"),
    Metric(
        "entropy",
        "mean over completion tokens of -sum_v p log p",
        "of the rollout policy's full distribution (not a sampled-token NLL)",
    ),
    Metric(
        "policy_loss", "token-weighted mean over the update of the clipped surrogate", "fastppo.policy_loss, loss_agg"
    ),
    Metric("value_loss", "token-weighted mean of 0.5 (V - R)^2 (clipped)", "fastppo.value_loss; 0 without a critic"),
    Metric(
        "clip_frac",
        "fraction of update tokens whose ratio was clipped",
        "a few percent is healthy; large means too big steps",
    ),
    Metric(
        "approx_kl",
        "mean over update tokens of (r - 1) - log r, r = p / p_old",
        "k3 estimate of KL(old || new) per update (cleanrl/Schulman)",
    ),
    Metric("ratio_max", "largest ratio p / p_old over the update", "spikes point at unstable tokens"),
    Metric("value_clip_frac", "fraction of update tokens whose value was clipped", "0 without a critic"),
    Metric(
        "explained_variance",
        "1 - Var[R - V_old] / Var[R] over completion tokens",
        "how well the critic predicts the returns (1 perfect, <= 0 useless); NaN without a critic",
    ),
    Metric(
        "grad_norm",
        "mean over optimizer steps of the policy's gradient norm before clipping",
        "0 while the policy is frozen",
    ),
    Metric(
        "critic_grad_norm",
        "mean over optimizer steps of the critic's gradient norm before clipping",
        "0 without a critic",
    ),
    Metric("lr", "the policy's learning rate at the step's first optimizer step", ""),
    Metric("critic_lr", "the critic's learning rate at the step's first optimizer step", "0 without a critic"),
    Metric("response_length_mean", "mean number of completion tokens", "stop token included"),
    Metric("truncated_rate", "fraction of completions that hit max_new_tokens without a stop token", ""),
    Metric(
        "reward_length_corr",
        "Pearson correlation of the score with the completion length",
        "a reward-hacking monitor: near 1 means the reward pays for length",
    ),
    Metric(
        "rollout_logprob_diff",
        "mean over completion tokens of |log p_generator - log p_training|",
        "rollout/training mismatch; ~1e-6 in fp32",
    ),
    Metric("tokens_per_s", "completion tokens / time_step_s", "end-to-end throughput"),
    Metric("time_rollout_s", "seconds of generation", "fastppo.Generator"),
    Metric("time_score_s", "seconds of the reward function / model", ""),
    Metric("time_prepare_s", "seconds of the old, reference and value forwards and the advantages", ""),
    Metric("time_train_s", "seconds of the PPO epochs", ""),
    Metric("time_step_s", "seconds of the whole step", ""),
    Metric("peak_mem_mb", "peak allocated accelerator memory in the step (MiB; CPU: peak RSS of the process)", ""),
    Metric(
        "world_size",
        "number of ranks (torchrun processes) the batch was split over",
        "every other metric is of the whole batch; times and memory are rank 0's",
    ),
]
NAMES = [m.name for m in METRICS]


def markdown_table() -> str:
    """The metric table of the docs, rendered from :data:`METRICS`."""
    lines = ["| metric | formula | meaning |", "|---|---|---|"]
    lines += [f"| `{m.name}` | {m.formula} | {m.doc} |" for m in METRICS]
    return "\n".join(lines)


class Mean:
    """Weighted means of tensors, kept on ``device`` until :meth:`result` (one host read for all).

    ``add(name, value, weight=1)``: ``value`` (0-dim tensor or number) is already the mean of ``weight``
    items, e.g. a mini-batch's token-mean loss with its token count. ``max(name, value)`` keeps a maximum.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self._acc: dict = {}  # name -> [weighted sum, weight] or [max, nan]

    def _t(self, x) -> torch.Tensor:
        return (x.detach() if isinstance(x, torch.Tensor) else torch.tensor(float(x))).float().to(self.device)

    def add(self, name: str, value, weight=1.0) -> None:
        value, weight = self._t(value), self._t(weight)
        s, w = self._acc.get(name, (0.0, 0.0))
        self._acc[name] = (s + value * weight, w + weight)

    def add_sum(self, name: str, total, count) -> None:
        """``total`` is a sum over ``count`` items (a micro-batch's share of a mini-batch loss, say)."""
        total, count = self._t(total), self._t(count)
        s, w = self._acc.get(name, (0.0, 0.0))
        self._acc[name] = (s + total, w + count)

    def max(self, name: str, value) -> None:
        value = self._t(value)
        self._acc[name] = (value if name not in self._acc else torch.maximum(self._acc[name][0], value), None)

    def result(self, dist=None) -> dict:
        """``{name: float}``; a mean of total weight 0 is 0. With ``dist`` (a :class:`Dist`, every rank
        holding the same names), the sums, weights and maxima are over all ranks."""
        if not self._acc:
            return {}
        rows = [
            torch.stack([s, torch.ones_like(s)]) if w is None else torch.stack([s, w]) for s, w in self._acc.values()
        ]
        table = torch.stack(rows)
        if dist is not None and dist.enabled:
            is_max = torch.tensor([w is None for _, w in self._acc.values()], device=table.device)[:, None]
            total = dist.sum(table.masked_fill(is_max, 0.0))
            top = dist.max(table.masked_fill(~is_max, -math.inf))
            table = torch.where(is_max, top, total)
        sums, weights = table.cpu().double().unbind(1)
        means = torch.where(weights != 0, sums / weights.clamp_min(1e-300), 0.0)
        return dict(zip(self._acc, means.tolist()))


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN when one is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory since the last reset (CUDA), or the process's peak RSS (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``1 - Var[returns - values] / Var[returns]`` over valid tokens (cleanrl's); NaN when Var[returns] = 0.
    Without ``mask``, over every element (values already selected)."""
    if mask is not None:
        m = mask.bool()
        values, returns = values[m], returns[m]
    y, v = returns.double(), values.double()
    if y.numel() < 2:
        return math.nan
    var_y = y.var()
    return math.nan if var_y == 0 else float(1 - (y - v).var() / var_y)


_UPDATE = ["policy_loss", "value_loss", "clip_frac", "approx_kl", "ratio_max", "value_clip_frac", "grad_norm",
           "critic_grad_norm", "critic_lr"]  # fmt: skip


def step_metrics(step, roll, scores, components, exp, info, meter: Mean, times: dict, device, dist=None) -> dict:
    """The :data:`METRICS` of one step, in their order, then ``reward/<component>``. ``roll``: the
    :class:`Rollout`; ``scores``: raw scores ``[B]``; ``exp``: the :class:`Experience`; ``info``: the
    prepare stage's ``rewards``, ``kl``, ``kl_coef``, ``entropy``, ``logprobs``; ``meter``: the update's
    :class:`Mean`; ``times``: seconds per stage. Reads the device once for the rollout quantities.

    ``dist`` (a :class:`Dist` under torchrun): each rank passes its share of the batch and gets the
    metrics of the whole batch: per-completion and per-token values are gathered from all ranks
    (``info``'s ``kl`` and ``entropy`` are global already), the update's sums and counts all-reduced;
    ``world_size`` is added. Times and memory are this rank's."""
    from fastppo.trainer.distributed import SINGLE, masked_mean

    dist = dist or SINGLE
    cmask = roll.completion_mask.bool()
    lengths = dist.gather(cmask.sum(-1).float())
    seq_reward = dist.gather(info["rewards"].sum(-1))
    ended = dist.gather(roll.ended.float().to(lengths.device))
    scores = dist.gather(scores.to(device)).cpu()
    on_device = {
        "reward_mean": seq_reward.mean(),
        "reward_std": seq_reward.std() if len(seq_reward) > 1 else seq_reward.sum() * 0,
        "kl": info["kl"],
        "entropy": info["entropy"],
        "response_length_mean": lengths.mean(),
        "truncated_rate": (1 - ended).mean(),
        "rollout_logprob_diff": masked_mean((roll.rollout_logprobs - info["logprobs"]).abs(), cmask, dist),
        "tokens": lengths.sum(),
    }
    out = dict(zip(on_device, torch.stack(list(on_device.values())).tolist()))
    ev = math.nan
    if exp.values is not None:
        ev = explained_variance(dist.gather(exp.values[cmask]), dist.gather(exp.returns[cmask]))
    out.update(
        step=step,
        score_mean=scores.mean().item(),
        score_std=scores.std().item() if len(scores) > 1 else 0.0,
        kl_coef=info["kl_coef"],
        reward_length_corr=pearson(scores, lengths.cpu()),
        explained_variance=ev,
        **dict.fromkeys(_UPDATE, 0.0),
    )
    out.update(meter.result(dist))
    out.update({f"time_{k}_s": v for k, v in times.items()})
    out["tokens_per_s"] = out.pop("tokens") / times["step"] if times["step"] > 0 else 0.0
    out["peak_mem_mb"] = peak_memory_mb(device)
    out["world_size"] = dist.world_size
    ordered = {k: out[k] for k in NAMES}
    ordered.update({f"reward/{k}": v.mean().item() for k, v in components.items()})
    return ordered
