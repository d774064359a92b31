"""Reward-model training on preference pairs (Bradley–Terry), and scoring texts with a reward model.

    rm = reward_model_from_policy(policy)   # or any AutoModelForSequenceClassification with num_labels=1
    result = train_reward_model(rm, tokenizer, pairs, eval_pairs=held_out)
    result.eval_accuracy                                         # share of held-out pairs ranked right
    scores = score_texts(rm, tokenizer, prompts, completions)    # float32 [N]

A pair is ``(prompt, chosen, rejected)``: two completions of one prompt, ``chosen`` preferred. The
model reads ``prompt + completion`` (one string, tokenized by the reward model's own tokenizer, so it
may differ from the policy's) followed by EOS, and its score ``r`` is the scalar head's output at the
last token, as Hugging Face's sequence-classification models pool. The loss over a batch of pairs is
the Bradley–Terry negative log-likelihood plus an optional centering term (Eisenstein et al. 2023,
TRL's ``center_rewards_coefficient``) that keeps scores near 0 without changing their order:

    loss = mean_pairs[ -log sigmoid(r_chosen - r_rejected) ] + center_coef * mean_pairs[ (r_chosen + r_rejected)^2 ]

Pooling: rows are left-padded with position ids counted from the attention mask, and the model is
called with input embeddings, so the pooled token is the last real one whatever the padding side of
the tokenizer, whether it has a pad token, and even when the last token *is* the pad id (a tokenizer
whose pad token is its EOS). This suits decoder reward models (Llama, Qwen2, Mistral, GPT-2, ...:
every ``*ForSequenceClassification`` of a causal LM); encoder models that pool a first [CLS] token
(BERT, DeBERTa) are not supported.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastppo._checks import check_bool, check_number
from fastppo.trainer.experience import pad_left
from fastppo.trainer.models import position_ids
from fastppo.trainer.sft import check_loop_fields, check_pretrained, fill_id, make_optimizer, read_records

_PAIR = ("prompt", "chosen", "rejected")


@dataclass
class RewardModelConfig:
    """Hyper-parameters of :func:`train_reward_model`."""

    epochs: int = 1
    """Passes over the pairs (shuffled at each pass). Reward models overfit fast: 1 is the usual choice."""
    batch_size: int = 32
    """Pairs per optimizer step (each step scores ``2 * batch_size`` texts in one forward)."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear warm-up, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps over which the learning rate rises linearly from 0 to ``lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global L2 norm to this value (``None``: no clipping)."""
    max_length: int = 512
    """Most tokens a scored text keeps (EOS included); a longer one loses its *first* tokens, so that
    the completion's end, where the score is read, stays."""
    append_eos: bool = True
    """Append the tokenizer's EOS to every text, so the score is read at a fixed token that has seen
    the whole completion; pass the same value to :func:`score_texts`."""
    center_coef: float = 0.0
    """Weight of the centering term ``mean((r_chosen + r_rejected)^2)`` (0: off; TRL suggests 0.01)."""
    seed: int = 0
    """Seeds the shuffling (and dropout, inside a forked RNG: the caller's RNG state is untouched)."""

    def __post_init__(self):
        check_loop_fields(self)
        check_bool("append_eos", self.append_eos)
        check_number("center_coef", self.center_coef, ge=0)


@dataclass
class RewardModelResult:
    """What :func:`train_reward_model` returns (the model itself is trained in place)."""

    losses: list[float] = field(default_factory=list)
    """Loss of each optimizer step's batch, before the step (Bradley–Terry + centering)."""
    train_accuracy: float = math.nan
    """Share of the training pairs ranked right after training (``r_chosen > r_rejected``; a tie counts 1/2)."""
    eval_accuracy: float | None = None
    """The same on ``eval_pairs`` (None without them): the number that says whether the model generalises."""
    eval_margin: float | None = None
    """Mean ``r_chosen - r_rejected`` on ``eval_pairs`` (None without them)."""
    steps: int = 0
    """Optimizer steps taken."""
    seconds: float = 0.0
    """Wall-clock time of the training loop (the final accuracy passes excluded)."""


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, center_coef: float = 0.0) -> torch.Tensor:
    """``mean(-log sigmoid(chosen - rejected)) + center_coef * mean((chosen + rejected)^2)``, 0-dim float32.

    ``chosen``, ``rejected``: ``[B]`` float scores of the two completions of each pair.
    """
    center_coef = check_number("center_coef", center_coef, ge=0)
    chosen, rejected = chosen.float(), rejected.float()
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).square().mean()
    return loss


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def check_reward_model(name: str, model) -> None:
    """A Hugging Face sequence-classification model with one output (``num_labels=1``), or a clear error."""
    check_pretrained(name, model)
    if not type(model).__name__.endswith("ForSequenceClassification") or model.config.num_labels != 1:
        raise TypeError(
            f"{name} must be a sequence-classification model with num_labels=1 "
            f"(AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)), got {type(model).__name__} "
            f"with num_labels={model.config.num_labels}"
        )


def _encode(tokenizer, prompts, completions, *, max_length: int, append_eos: bool) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("tokenizer has no eos_token_id: pass append_eos=False (config.append_eos) to score without it")
    rows = tokenizer([p + c for p, c in zip(prompts, completions)])["input_ids"]
    rows = [[*r, eos] if append_eos else list(r) for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt + completion tokenized to no token at all: there is nothing to score")
    return [r[-max_length:] for r in rows]


@contextlib.contextmanager
def _pool_last_position(model):
    """Let a sequence-classification model pool the last position of a batch given as embeddings.

    Hugging Face models refuse a batch of several rows when ``config.pad_token_id`` is None (they
    would find each row's end through it), and warn that embeddings hide padding; our rows are
    left-padded, so the last position is every row's end. A placeholder pad id and a quiet logger
    for the duration of the call; both restored after.
    """
    from transformers.utils import logging

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    saved_pad, verbosity = config.pad_token_id, logging.get_verbosity()
    if saved_pad is None:
        config.pad_token_id = 0
    logging.set_verbosity_error()
    try:
        yield
    finally:
        config.pad_token_id = saved_pad
        logging.set_verbosity(verbosity)


def _forward_scores(model, rows: list[list[int]], fill: int) -> torch.Tensor:
    """Scores ``[len(rows)]`` float32 of token lists, read at each row's last token (differentiable)."""
    device = next(model.parameters()).device
    ids, mask = pad_left(rows, fill, device)
    embeds = model.get_input_embeddings()(ids)
    with _pool_last_position(model):
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, 0].float()


def score_texts(
    model,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    append_eos: bool = True,
) -> torch.Tensor:
    """Reward-model scores of ``prompt + completion`` texts: float32 ``[N]`` on the model's device.

    ``model``: a sequence-classification model with ``num_labels=1``; ``tokenizer``: *its* tokenizer
    (texts are re-tokenized, so the policy's tokenizer may differ). ``max_length`` and ``append_eos``
    as in :class:`RewardModelConfig` (use the values the model was trained with). Runs under
    ``torch.no_grad()`` in eval mode (the model's mode is restored), ``batch_size`` texts per forward;
    a text's score does not depend on the others in its batch.
    """
    check_reward_model("model", model)
    batch_size = check_number("batch_size", batch_size, ge=1, integer=True)
    max_length = check_number("max_length", max_length, ge=1, integer=True)
    append_eos = check_bool("append_eos", append_eos)
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
        )
    for name, texts in (("prompts", prompts), ("completions", completions)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] must be a str, got {type(texts[bad]).__name__}")
    device = next(model.parameters()).device
    if not prompts:
        return torch.zeros(0, device=device)
    rows = _encode(tokenizer, prompts, completions, max_length=max_length, append_eos=append_eos)
    fill, was_training = fill_id(tokenizer), model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [_forward_scores(model, rows[i : i + batch_size], fill) for i in range(0, len(rows), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def pair_accuracy(model, tokenizer, pairs, *, batch_size: int = 32, max_length: int = 512, append_eos: bool = True):
    """``(accuracy, mean margin)`` of a reward model on ``(prompt, chosen, rejected)`` pairs: the share with
    ``r_chosen > r_rejected`` (a tie counts 1/2) and the mean of ``r_chosen - r_rejected``."""
    records = read_records("pairs", pairs, _PAIR)
    prompts = [p for p, _, _ in records]
    kw = dict(batch_size=batch_size, max_length=max_length, append_eos=append_eos)
    chosen = score_texts(model, tokenizer, prompts, [c for _, c, _ in records], **kw)
    rejected = score_texts(model, tokenizer, prompts, [r for _, _, r in records], **kw)
    diff = chosen - rejected
    accuracy = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return accuracy.item(), diff.mean().item()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def reward_model_from_policy(policy, *, dtype=None):
    """A reward model initialised from a causal LM (InstructGPT, OpenRLHF): a copy of its body and a
    zero scalar head (every score starts at 0), as the matching ``*ForSequenceClassification`` class
    with ``num_labels=1``. The policy is not modified.

    ``policy``: a Hugging Face causal LM whose class has a sequence-classification sibling
    (``AutoModelForSequenceClassification.from_config`` knows its config); ``dtype``: the copy's
    dtype (default: the policy's).
    """
    from transformers import AutoModelForSequenceClassification

    check_pretrained("policy", policy)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    try:
        rm = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise TypeError(f"policy: {type(policy).__name__} has no sequence-classification sibling ({err})") from err
    body_prefix = rm.base_model_prefix
    missing, unexpected = rm.load_state_dict(policy.state_dict(), strict=False)
    head_missing = [k for k in missing if not k.startswith(body_prefix + ".")]
    body_missing = [k for k in missing if k.startswith(body_prefix + ".")]
    if body_missing or not head_missing:
        raise TypeError(f"policy: the body of {type(policy).__name__} does not load into {type(rm).__name__}")
    for name in head_missing:
        torch.nn.init.zeros_(rm.get_parameter(name))
    del unexpected  # the LM head, which the reward model has no use for
    param = next(policy.parameters())
    return rm.to(device=param.device, dtype=dtype or param.dtype).train(policy.training)


def train_reward_model(model, tokenizer, pairs, *, config: RewardModelConfig | None = None, eval_pairs=None):
    """Train ``model`` (in place) on preference pairs with the Bradley–Terry loss; report pair accuracy.

    Args:
        model: a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1`` (see
            :func:`reward_model_from_policy`); left in the train/eval mode it came in.
        tokenizer: the reward model's tokenizer (a missing pad token is fine).
        pairs: a non-empty sequence of ``(prompt, chosen, rejected)`` string triples, or of mappings
            with those keys (TRL's preference-dataset columns).
        config: :class:`RewardModelConfig` (default: ``RewardModelConfig()``).
        eval_pairs: held-out pairs of the same form, for ``eval_accuracy`` (optional).

    Returns:
        :class:`RewardModelResult`. Deterministic on CPU given ``config.seed`` and the model's weights.
    """
    config = RewardModelConfig() if config is None else config
    if not isinstance(config, RewardModelConfig):
        raise TypeError(f"config must be a RewardModelConfig, got {type(config).__name__}")
    check_reward_model("model", model)
    records = read_records("pairs", pairs, _PAIR)
    held_out = None if eval_pairs is None else read_records("eval_pairs", eval_pairs, _PAIR)
    enc = dict(max_length=config.max_length, append_eos=config.append_eos)
    chosen = _encode(tokenizer, [p for p, _, _ in records], [c for _, c, _ in records], **enc)
    rejected = _encode(tokenizer, [p for p, _, _ in records], [r for _, _, r in records], **enc)
    device, fill = next(model.parameters()).device, fill_id(tokenizer)
    steps_per_epoch = math.ceil(len(records) / config.batch_size)
    opt, sched, params = make_optimizer(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        decay=True,
        total_steps=config.epochs * steps_per_epoch,
    )
    result = RewardModelResult()
    was_training = model.training
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed)
        model.train()
        try:
            for _ in range(config.epochs):
                for rows in torch.randperm(len(records), generator=shuffle).split(config.batch_size):
                    rows = rows.tolist()
                    scores = _forward_scores(model, [chosen[i] for i in rows] + [rejected[i] for i in rows], fill)
                    loss = bradley_terry_loss(scores[: len(rows)], scores[len(rows) :], center_coef=config.center_coef)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    sched.step()
                    result.losses.append(loss.item())
                    result.steps += 1
        finally:
            model.train(was_training)
    result.seconds = time.perf_counter() - t0
    kw = dict(batch_size=2 * config.batch_size, **enc)
    result.train_accuracy, _ = pair_accuracy(model, tokenizer, records, **kw)
    if held_out is not None:
        result.eval_accuracy, result.eval_margin = pair_accuracy(model, tokenizer, held_out, **kw)
    return result
