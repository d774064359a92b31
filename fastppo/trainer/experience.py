"""Experience: rollout -> scores -> token rewards (KL in the reward) -> advantages.

The pieces are public so that another trainer can reuse them: :func:`rollout`, :func:`token_rewards`,
:class:`FixedKLController` / :class:`AdaptiveKLController`, :func:`compute_advantages`.

Shapes: ``B`` completions (prompts x samples, a prompt's samples consecutive), prompt width ``P``,
completion width ``N``; ``completion_mask [B, N]`` bool marks real completion tokens (the stop token
included).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from fastppo._checks import check_choice, check_float, check_mask, check_number
from fastppo.advantages import gae, group_advantages, masked_whiten
from fastppo.trainer import distributed


# --------------------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Completions of one step. ``sequences [B, P + N]`` int64 and ``attention_mask [B, P + N]`` bool
    (left-padded prompts, then the completions), ``completion_mask [B, N]``, ``rollout_logprobs [B, N]``
    (the Generator's), ``ended [B]`` (stopped by a stop token), ``prompt_index`` (the dataset index of
    each row's prompt), ``prompts``/``completions`` (texts), ``columns`` (the prompts' other fields, per
    row), ``seconds`` (generation time)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    prompt_length: int
    ended: torch.Tensor
    prompt_index: list
    prompts: list
    completions: list
    columns: dict
    seconds: float

    @property
    def completion_ids(self) -> list:
        """Each row's completion tokens as a list (for a reward model that shares the policy's tokenizer)."""
        c = self.sequences[:, self.prompt_length :]
        return [row[m].tolist() for row, m in zip(c.cpu(), self.completion_mask.cpu())]


def pad_left(rows: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``(input_ids [B, P], attention_mask [B, P] bool)``, left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids.to(device), mask.to(device)


def rollout(
    generator,
    tokenizer,
    dataset,
    indices: list,
    *,
    samples_per_prompt: int = 1,
    stop_ids=None,
    pad_id: int = 0,
    rng=None,
    **sampling,
) -> Rollout:
    """Sample ``samples_per_prompt`` completions for each prompt ``dataset.ids[i]``, ``i in indices``.

    ``generator``: a :class:`fastppo.Generator`; ``stop_ids``: stop token ids (None: never stop early);
    ``sampling``: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``do_sample`` as
    :meth:`fastppo.Generator.generate`; ``rng``: the ``torch.Generator`` that seeds the sampling.
    """
    rows = [i for i in indices for _ in range(samples_per_prompt)]
    device = next(generator.model.parameters()).device
    ids, mask = pad_left([dataset.ids[i] for i in rows], pad_id, device)
    out = generator.generate(ids, mask, eos_token_id=stop_ids or None, pad_token_id=pad_id, generator=rng, **sampling)
    cmask = out.completion_mask
    completion = out.completions
    lengths = cmask.sum(-1)
    last = completion.gather(1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
    stops = torch.as_tensor(list(stop_ids or []), dtype=torch.long, device=device)
    ended = (lengths > 0) & torch.isin(last, stops)
    texts = tokenizer.batch_decode(torch.where(cmask, completion, pad_id).tolist(), skip_special_tokens=True)
    return Rollout(
        sequences=out.sequences,
        attention_mask=torch.cat([mask, cmask], dim=1),
        completion_mask=cmask,
        rollout_logprobs=out.logprobs,
        prompt_length=out.prompt_length,
        ended=ended,
        prompt_index=rows,
        prompts=[dataset.prompts[i] for i in rows],
        completions=texts,
        columns={k: [v[i] for i in rows] for k, v in dataset.columns.items()},
        seconds=out.seconds,
    )


# --------------------------------------------------------------------------------------------------
# KL coefficient
# --------------------------------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient ``value``."""

    def __init__(self, value: float):
        self.value = check_number("kl_coef", value, ge=0)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019)'s adaptive coefficient, in verl's form: after a batch of ``n_steps``
    completions whose KL was ``current_kl``, ``value *= 1 + clip(current_kl / target - 1, -0.2, 0.2)
    * n_steps / horizon``."""

    def __init__(self, value: float, target: float, horizon: float):
        super().__init__(value)
        self.target = check_number("kl_target", target, gt=0)
        self.horizon = check_number("kl_horizon", horizon, gt=0)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------------------------------
# rewards and advantages
# --------------------------------------------------------------------------------------------------
def last_token_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool: each row's last valid token (none for an empty row)."""
    m = completion_mask.bool()
    return m & (m.long().cumsum(-1) == m.sum(-1, keepdim=True))


def token_rewards(
    scores: torch.Tensor, completion_mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards ``[B, N]`` float32: ``-kl_coef * kl`` on every valid token, plus each row's
    sequence score ``scores [B]`` on its last valid token; 0 on padding.

    ``kl``: per-token KL ``[B, N]`` (e.g. :func:`fastppo.kl_penalty` of the old and reference
    log-probs), or None for no penalty.
    """
    check_float("scores", scores)
    mask = check_mask("completion_mask", completion_mask, (scores.shape[0], completion_mask.shape[-1]))
    check_number("kl_coef", kl_coef, ge=0)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None:
        check_float("kl", kl)
        rewards = torch.where(mask, -kl_coef * kl.float(), rewards)
    return rewards + torch.where(last_token_mask(mask), scores.float().to(mask.device)[:, None], 0.0)


def compute_advantages(
    kind: str,
    rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    whiten: bool = True,
    dist=None,
):
    """``(advantages [B, N], returns [B, N] or None)`` from token rewards.

    ``"gae"``: :func:`fastppo.gae` with the critic's ``values`` (returns are the value targets).
    ``"grpo"`` / ``"rloo"``: each row's total reward ``rewards.sum(-1)`` against its prompt's group of
    ``group_size`` consecutive rows (:func:`fastppo.group_advantages`), on every valid token; no returns.
    ``whiten``: :func:`fastppo.masked_whiten` over the valid tokens of the batch; with ``dist`` (a
    :class:`fastppo.trainer.distributed.Dist`), of the batch of all ranks (each passes its share; a
    prompt's group of samples lives on one rank).
    """
    check_choice("advantage", kind, ("gae", "grpo", "rloo"))
    mask = completion_mask.bool()
    if kind == "gae":
        if values is None:
            raise ValueError("advantage='gae' needs the critic's values")
        adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    else:
        seq = group_advantages(rewards.sum(-1), group_size, kind=kind)
        adv, returns = torch.where(mask, seq[:, None], 0.0), None
    if whiten:
        adv = masked_whiten(adv, mask) if dist is None else distributed.masked_whiten(adv, mask, dist)
    return adv, returns


# --------------------------------------------------------------------------------------------------
# the batch the PPO update reads
# --------------------------------------------------------------------------------------------------
@dataclass
class Experience:
    """What the update needs, per completion row: the tokens (``sequences``, ``attention_mask``,
    ``completion_mask``, ``prompt_length``), the old policy's ``logprobs``, the reference's
    ``ref_logprobs`` (None without KL), the critic's ``values`` and ``returns`` (None without a critic)
    and the ``advantages``; all ``[B, N]`` but the first two ``[B, P + N]``.

    ``live_logprobs`` / ``live_entropy`` / ``live_values``: the policy's and the critic's outputs of
    prepare *with their autograd graphs* (``PPOAlgoConfig.keep_first_forward``), whose detached values are
    ``logprobs`` and ``values``: the first mini-batch's forwards, already run (None: not kept)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int
    logprobs: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    live_logprobs: torch.Tensor | None = None
    live_entropy: torch.Tensor | None = None
    live_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def widths(self, parts: list) -> list[int]:
        """For each index tensor of ``parts``, the completion width of its rows: one past their last valid
        token, at least 1 (:meth:`select`'s trim), read from the device at once."""
        m = self.completion_mask.bool()
        ends = torch.where(m, torch.arange(1, m.shape[1] + 1, device=m.device), 0).amax(-1)  # [B]
        return torch.stack([ends[rows].amax().clamp_min(1) for rows in parts]).tolist()

    @property
    def live(self) -> bool:
        """Whether prepare's forwards are kept here (see the class docstring)."""
        return self.live_logprobs is not None or self.live_values is not None

    def without_live(self) -> Experience:
        """This batch without the kept forwards: they serve one mini-batch, before any weight changes."""
        return replace(self, live_logprobs=None, live_entropy=None, live_values=None)

    def select(self, rows: torch.Tensor, width: int | None = None) -> Experience:
        """The rows ``rows`` (an index tensor), trimmed to the longest completion among them (``width``:
        that length, from :meth:`widths`; None: read here)."""
        cut = {}
        n = self.widths([rows])[0] if width is None else width
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[rows]
                v = v[:, : self.prompt_length + n] if f.name in ("sequences", "attention_mask") else v[:, :n]
            cut[f.name] = v
        return Experience(**cut)
