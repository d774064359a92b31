"""The ops as the RLHF libraries write them, each labelled with project, file and version.

Each function transcribes the released code (statement for statement, names kept; distributed
arguments at their single-process defaults, configuration objects replaced by the fields they
carry, ``.item()`` host reads kept where the code has them): TRL 1.12.0 (the last release with
``trl.experimental.ppo``), OpenRLHF 0.11.2 and verl 0.9.1, as published on PyPI. ``SOURCES`` maps
each to where it comes from; the benchmark rows carry that label.

Optional peers, when importable: Liger-Kernel 0.8.5 and Cut-Cross-Entropy 25.1.1 (CUDA only, the
versions ``bench/fetch_wheels.sh`` fetches), and ``torch.compile``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Source:
    """Where a baseline's code comes from."""

    project: str
    version: str
    file: str
    name: str

    def __str__(self) -> str:
        return f"{self.project} {self.version} {self.file}: {self.name}"


TRL = ("TRL", "1.12.0")
OPENRLHF = ("OpenRLHF", "0.11.2")
VERL = ("verl", "0.9.1")
SOURCES: dict[str, Source] = {}


def _from(project: tuple[str, str], file: str, name: str | None = None):
    def mark(fn: Callable) -> Callable:
        SOURCES[fn.__name__] = Source(*project, file, name or fn.__name__.split("_", 1)[1])
        return fn

    return mark


def importable(module: str) -> str | None:
    """None if ``module`` imports, else why not (a baseline's availability)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # not installed, or a build that fails to import
        return f"{module} not importable ({type(e).__name__})"
    return None


# ------------------------------------------------------------------------------------------- TRL 1.12.0
@_from(TRL, "trl/trainer/utils.py")
def trl_selective_log_softmax(logits, index) -> torch.Tensor:
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)

    if logits.dtype in [torch.float32, torch.float64]:
        selected_logits = torch.gather(logits, dim=-1, index=index)
        # loop to reduce peak mem consumption
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        per_token_logps = selected_logits - logsumexp_values.unsqueeze(-1)  # log_softmax(x_i) = x_i - logsumexp(x)
    else:
        # logsumexp approach is unstable with bfloat16, fall back to slightly less efficient approach
        per_token_logps = []
        for row_logits, row_labels in zip(logits, index, strict=True):  # loop to reduce peak mem consumption
            row_logps = F.log_softmax(row_logits, dim=-1)
            row_per_token_logps = row_logps.gather(dim=-1, index=row_labels)
            per_token_logps.append(row_per_token_logps)
        per_token_logps = torch.stack(per_token_logps)

    if squeeze:
        per_token_logps = per_token_logps.squeeze(-1)

    return per_token_logps


@_from(TRL, "trl/trainer/utils.py")
def trl_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    original_shape = logits.shape[:-1]  # all dims except num_classes
    num_classes = logits.shape[-1]

    # Flatten all leading dimensions into one
    flat_logits = logits.reshape(-1, num_classes)

    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        chunk_entropy = -(torch.exp(logps) * logps).sum(-1)
        entropies.append(chunk_entropy)

    entropies = torch.cat(entropies, dim=0)
    return entropies.reshape(original_shape)


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py")
def trl_masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: bool | None = None) -> torch.Tensor:
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py")
def trl_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py")
def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py", "PPOTrainer.train, the policy loss (inline)")
def trl_policy_loss(new_logprobs, mb_logprobs, mb_advantage, mask, cliprange=0.2):
    """``mask`` is TRL's ``~padding_mask[micro_batch_inds]``."""
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, mask)
    with torch.no_grad():
        pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), mask)
        approxkl = 0.5 * (logprobs_diff**2).mean()
    return pg_loss, pg_clipfrac, approxkl


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py", "PPOTrainer.train, the value loss (inline)")
def trl_value_loss(vpred, mb_values, mb_return, mask, cliprange_value=0.2):
    """``mask`` is TRL's ``~padding_mask_p1[micro_batch_inds]``."""
    vpredclipped = torch.clamp(
        vpred,
        mb_values - cliprange_value,
        mb_values + cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, mask)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return vf_loss, vf_clipfrac


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py", "PPOTrainer.train, the k3 KL (inline)")
def trl_kl_k3(logprobs, ref_logprobs):
    logr = ref_logprobs - logprobs
    kl = (logr.exp() - 1) - logr  # k3
    return kl


@_from(TRL, "trl/experimental/ppo/ppo_trainer.py", "PPOTrainer.train, the GAE loop (inline)")
def trl_gae(rewards, values, gamma, lam):
    """``values`` masked as TRL masks them (``masked_fill(values, padding_mask_p1, 0)``), ``rewards`` 0 there."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


# ------------------------------------------------------------------------------------- OpenRLHF 0.11.2
@_from(OPENRLHF, "openrlhf/models/utils.py")
def openrlhf_masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


@_from(OPENRLHF, "openrlhf/models/utils.py")
def openrlhf_logsumexp_by_chunk(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    seq_len = logits.shape[0]
    logsumexp_values = torch.zeros((seq_len), device=logits.device, dtype=logits.dtype)
    for s_idx in range(0, seq_len, chunk_size):
        end_idx = min(s_idx + chunk_size, seq_len)
        logsumexp_values[s_idx:end_idx] = torch.logsumexp(logits[s_idx:end_idx], dim=-1)

    return logsumexp_values


@_from(OPENRLHF, "openrlhf/models/utils.py")
def openrlhf_log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.dtype in [torch.float32, torch.float64]:
        batch_dim = logits.shape[:-1]
        last_dim = logits.shape[-1]
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            output = cross_entropy_loss(logits.reshape(-1, last_dim), labels.reshape(-1))
            log_probs_labels = -output[0].view(*batch_dim)
        except ImportError:
            logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
            logsumexp_values = openrlhf_logsumexp_by_chunk(logits.reshape(-1, last_dim))
            logsumexp_values = logsumexp_values.view(*batch_dim)
            log_probs_labels = logits_labels - logsumexp_values  # log_softmax(x_i) = x_i - logsumexp(x)
    else:
        log_probs_labels = []
        for row_logits, row_labels in zip(logits, labels):  # loop to reduce peak mem consumption
            row_log_probs = F.log_softmax(row_logits, dim=-1)
            row_log_probs_labels = row_log_probs.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1)
            log_probs_labels.append(row_log_probs_labels)
        log_probs_labels = torch.stack(log_probs_labels)
    return log_probs_labels


@_from(OPENRLHF, "openrlhf/models/utils.py", "compute_entropy (decorated @torch.compile there)")
def openrlhf_compute_entropy(logits: torch.Tensor):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return entropy


@_from(OPENRLHF, "openrlhf/models/loss.py")
def openrlhf_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None):
    """The token-level branch (``token_level_loss=True``, the PPO default)."""
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    raise NotImplementedError("only the token-level branch is transcribed")


@_from(OPENRLHF, "openrlhf/models/loss.py", "PolicyLoss.forward (ppo, no IS correction)")
def openrlhf_policy_loss(
    log_probs, old_log_probs, advantages, action_mask, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None
):
    raw_policy_log_ratio = log_probs - old_log_probs
    policy_log_ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0)
    ratio = policy_log_ratio.exp()

    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages

    if dual_clip is None:
        # Standard PPO
        loss = -torch.min(surr1, surr2)
    else:
        # Standard PPO clipping
        clip1 = torch.min(surr1, surr2)
        # Dual-clip: additional lower bound for negative advantages
        clip2 = torch.max(clip1, dual_clip * advantages)
        # Apply dual-clip: use clip2 for negative advantages, clip1 for positive advantages
        loss = -torch.where(advantages < 0, clip2, clip1)

    loss = openrlhf_aggregate_loss(loss, action_mask)
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    ppo_kl = openrlhf_masked_mean(-raw_policy_log_ratio.detach(), action_mask, dim=None)
    return loss, clip_ratio, ppo_kl


@_from(OPENRLHF, "openrlhf/models/loss.py", "ValueLoss.forward")
def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=None):
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        surr1 = (values_clipped - returns) ** 2
        surr2 = (values - returns) ** 2
        loss = torch.max(surr1, surr2)
    else:
        loss = (values - returns) ** 2

    loss = openrlhf_aggregate_loss(loss, action_mask)
    return 0.5 * loss


@_from(OPENRLHF, "openrlhf/models/utils.py", "compute_approx_kl (unbiased_gradient=False)")
def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    log_ratio = log_probs.float() - log_probs_base.float()

    if kl_estimator == "k1":
        value = log_ratio  # log_ratio is already p - q
    elif kl_estimator == "k2":
        value = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        # Below -10, k3 already exceeds the final cap. Bound before exp to
        # avoid an overflowing derivative (0 * inf) after the final clamp.
        k3_log_ratio = log_ratio.clamp(min=-10)
        value = (-k3_log_ratio).exp() - 1 + k3_log_ratio
    else:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")

    value = value.clamp(min=-10, max=10)
    return value


@_from(OPENRLHF, "openrlhf/trainer/ppo_utils/experience_maker.py", "get_advantages_and_returns")
def openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)

    # Mask invalid responses
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards

    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages.detach(), returns


@_from(OPENRLHF, "openrlhf/trainer/ppo_utils/experience_maker.py", "the advantage normalization (inline)")
def openrlhf_normalize_advantages(advantages_list, action_mask_list, no_std_norm=False):
    """The global normalization over a list of experiences (here: the lists' tensors)."""
    all_advantages = torch.cat([adv.flatten() for adv in advantages_list], dim=0).float()
    all_action_masks = torch.cat([mask.flatten() for mask in action_mask_list], dim=0)
    num_actions = all_action_masks.sum()

    mean = (all_advantages * all_action_masks).sum() / num_actions
    if not no_std_norm:
        var = ((all_advantages - mean).pow(2) * all_action_masks).sum() / num_actions
        rstd = var.clamp(min=1e-8).rsqrt()
    else:
        rstd = 1

    return [(adv - mean) * rstd for adv in advantages_list]


# ------------------------------------------------------------------------------------------ verl 0.9.1
def _verl_flash_ce():
    """verl's dispatch: flash-attn's Triton cross-entropy when importable (and not disabled)."""
    if os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") == "1":
        return None
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError:
        return None
    return cross_entropy_loss


@_from(VERL, "verl/utils/torch_functional.py")
def verl_logprobs_from_logits_v2(logits: torch.FloatTensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dtype in [torch.float32, torch.float64]:
        logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        # loop to reduce peak mem consumption
        logsumexp_values = torch.stack([torch.logsumexp(logit, dim=-1) for logit in logits])
        logprobs_labels = logits_labels - logsumexp_values  # log_softmax(x_i) = x_i - logsumexp(x)
    else:
        # logsumexp approach is unstable with bfloat16, fall back to slightly less efficent approach
        logprobs_labels = []
        for row_logits, row_labels in zip(logits, labels, strict=True):  # loop to reduce peak mem consumption
            row_logprobs = F.log_softmax(row_logits, dim=-1)
            row_logprobs_labels = row_logprobs.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1)
            logprobs_labels.append(row_logprobs_labels)
        logprobs_labels = torch.stack(logprobs_labels)
    return logprobs_labels


@_from(VERL, "verl/utils/torch_functional.py", "logprobs_from_logits (flash-attn CE if importable, else _v2)")
def verl_logprobs_from_logits(logits, labels, inplace_backward=True):
    cross_entropy_loss = _verl_flash_ce()
    if cross_entropy_loss is not None:
        batch_dim = logits.shape[:-1]
        last_dim = logits.shape[-1]
        logits = logits.reshape(-1, last_dim)
        labels = labels.reshape(-1)
        output = -cross_entropy_loss(logits, labels, inplace_backward=inplace_backward)[0]
        return output.view(*batch_dim)
    return verl_logprobs_from_logits_v2(logits, labels)


@_from(VERL, "verl/utils/torch_functional.py")
def verl_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    pd = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return entropy


@_from(VERL, "verl/utils/torch_functional.py")
def verl_masked_sum(values, mask, axis=None):
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


@_from(VERL, "verl/utils/torch_functional.py")
def verl_masked_mean(values, mask, axis=None):
    s = verl_masked_sum(values, mask, axis)
    return s / (mask.sum(axis=axis) + 1e-8)


@_from(VERL, "verl/utils/torch_functional.py")
def verl_masked_var(values, mask, unbiased=True):
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


@_from(VERL, "verl/utils/torch_functional.py")
def verl_masked_whiten(values, mask, shift_mean=True):
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


@_from(VERL, "verl/utils/torch_functional.py")
def verl_clip_by_value(x, tensor_min, tensor_max):
    clipped = torch.max(torch.min(x, tensor_max), tensor_min)
    return clipped


@_from(VERL, "verl/trainer/ppo/core_algos.py", "agg_loss (token-mean)")
def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    raise NotImplementedError("only token-mean is transcribed")


@_from(VERL, "verl/trainer/ppo/core_algos.py", "compute_policy_loss_vanilla")
def verl_policy_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    clip_ratio=0.2,
    clip_ratio_low=None,
    clip_ratio_high=None,
    clip_ratio_c=3.0,
):
    """``config``'s fields as arguments; ``rollout_is_weights=None``."""
    clip_ratio_low = clip_ratio_low if clip_ratio_low is not None else clip_ratio
    clip_ratio_high = clip_ratio_high if clip_ratio_high is not None else clip_ratio
    cliprange = clip_ratio
    cliprange_low = clip_ratio_low
    cliprange_high = clip_ratio_high

    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )

    negative_approx_kl = log_prob - old_log_prob
    # Clamp negative_approx_kl for stability
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)

    pg_loss = verl_agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode="token-mean")

    pg_metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }
    return pg_loss, pg_metrics


@_from(VERL, "verl/trainer/ppo/core_algos.py", "compute_value_loss")
def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
    vpredclipped = verl_clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_agg_loss(loss_mat=clipped_vf_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


@_from(VERL, "verl/trainer/ppo/core_algos.py", "kl_penalty_forward (low_var_kl / k3)")
def verl_kl_penalty_k3(logprob, ref_logprob):
    kl = ref_logprob - logprob
    # For numerical stability
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


@_from(VERL, "verl/trainer/ppo/core_algos.py", "compute_gae_advantage_return without its last masked_whiten")
def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """The whitening it ends with is timed by the ``whiten`` op (``verl_masked_whiten``)."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]

        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam

            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam

            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)

        returns = advantages + values
    return advantages, returns


# ------------------------------------------------------------------- Liger-Kernel, Cut-Cross-Entropy
LIGER = Source("Liger-Kernel", "0.8.5", "liger_kernel/transformers/functional.py", "")
CCE = Source("Cut-Cross-Entropy", "25.1.1", "cut_cross_entropy/linear_cross_entropy.py", "")


def liger_logprobs(logits, labels):
    """Liger's cross-entropy on logits, ``reduction="none"``, negated: log-probs only (no entropy)."""
    from liger_kernel.transformers.functional import liger_cross_entropy

    loss = liger_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return -loss.view(labels.shape)


def liger_linear_logprob_sum(hidden, weight, labels):
    """Liger's fused linear cross-entropy, ``reduction="sum"``, negated: the sum of the log-probs."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")


def cce_linear_logprob_sum(hidden, weight, labels):
    """Cut-Cross-Entropy with ``filter_eps=None`` (exact gradients, as RL needs), ``reduction="sum"``, negated."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, labels, reduction="sum", filter_eps=None)


# ------------------------------------------------------------------------------------ torch.compile
_COMPILED: dict[tuple, Callable] = {}


def compiled(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, made once per function and options (it compiles at its first call)."""
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]
