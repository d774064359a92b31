"""Supervised fine-tuning (the warm-up before RLHF) of a Hugging Face causal LM on (prompt, completion) pairs.

    result = sft(policy, tokenizer, [("sort cab: ", "abc"), ...], config=SFTConfig(epochs=2))
    result.losses   # one float per optimizer step

Per example the input is ``prompt_ids + completion_ids + [eos]``: the prompt tokenized as the
rollout tokenizes it (``tokenizer(prompt)``, special tokens included), the completion without
special tokens, then EOS so the policy learns to stop. The loss is the negative log-likelihood of
the completion tokens and the EOS only (prompt and padding labels are ``-100``), averaged over those
tokens in the whole batch (token-mean):

    loss = -sum_{t in completion} log p(x_t | x_<t) / (number of completion tokens in the batch)

Log-probabilities come from the body's last hidden states and the output embedding weight through
:func:`fastppo.linear_logprobs_and_entropy`, at the completion positions only: the ``[N, V]``
logits are never built. Optimizer: AdamW with a linear warm-up then a linear decay to 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

import fastppo
from fastppo._checks import check_bool, check_number
from fastppo.trainer.experience import pad_left
from fastppo.trainer.models import position_ids


@dataclass
class SFTConfig:
    """Hyper-parameters of :func:`sft`."""

    epochs: int = 1
    """Passes over the examples (shuffled at each pass)."""
    batch_size: int = 32
    """Examples per optimizer step (the last step of an epoch may have fewer)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps over which the learning rate rises linearly from 0 to ``lr``; it then
    decays linearly to 0 at the last step (with ``decay``)."""
    decay: bool = True
    """Decay the learning rate linearly to 0 after the warm-up (else keep ``lr``)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global L2 norm to this value (``None``: no clipping)."""
    max_length: int = 512
    """Most tokens per example (prompt + completion + EOS); a longer example is an error (naming it),
    since cutting it would teach the policy to stop early or to never stop."""
    seed: int = 0
    """Seeds the shuffling (and dropout, inside a forked RNG: the caller's RNG state is untouched)."""

    def __post_init__(self):
        check_loop_fields(self)
        check_bool("decay", self.decay)


def check_loop_fields(config) -> None:
    """The fields :class:`SFTConfig` and ``RewardModelConfig`` share: epochs, batch size, AdamW and its
    schedule, clipping, length and seed."""
    check_number("epochs", config.epochs, ge=1, integer=True)
    check_number("batch_size", config.batch_size, ge=1, integer=True)
    check_number("lr", config.lr, gt=0)
    check_number("weight_decay", config.weight_decay, ge=0)
    check_number("warmup_ratio", config.warmup_ratio, ge=0, lt=1)
    check_number("max_grad_norm", config.max_grad_norm, gt=0, allow_none=True)
    check_number("max_length", config.max_length, ge=2, integer=True)
    check_number("seed", config.seed, integer=True)


@dataclass
class SFTResult:
    """What :func:`sft` returns (the model itself is trained in place)."""

    losses: list[float] = field(default_factory=list)
    """Token-mean loss of each optimizer step's batch, before the step (nats per token)."""
    steps: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Completion tokens (EOS included) trained on, over all epochs."""
    seconds: float = 0.0
    """Wall-clock time of the training loop."""


# --------------------------------------------------------------------------------------------------
# Helpers shared with reward_model.py: reading records, padding, positions, LR schedule
# --------------------------------------------------------------------------------------------------
def read_records(name: str, data, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``data`` as a list of string tuples: each item a tuple/list of ``len(fields)`` strings in that
    order, or a mapping with those keys (a dataset row; other keys are ignored). Errors name
    ``name[i]`` and the field."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"{name} must be a sequence of {fields} records, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} must not be empty")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):
            missing = [f for f in fields if f not in item]
            if missing:
                raise ValueError(f"{name}[{i}] lacks the key(s) {missing} (a record needs {fields})")
            values = tuple(item[f] for f in fields)
        elif isinstance(item, (tuple, list)) and len(item) == len(fields):
            values = tuple(item)
        else:
            raise TypeError(f"{name}[{i}] must be a {len(fields)}-tuple {fields} or a mapping with those keys")
        for f, v in zip(fields, values):
            if not isinstance(v, str):
                raise TypeError(f"{name}[{i}].{f} must be a str, got {type(v).__name__}")
        out.append(values)
    return out


def fill_id(tokenizer) -> int:
    """A token id for padding positions (never attended, never a label): pad, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def check_pretrained(name: str, model) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{name} must be a transformers PreTrainedModel, got {type(model).__name__}")


def _lr_lambda(total: int, warmup: int, decay: bool):
    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not decay:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def make_optimizer(model, *, lr, weight_decay, warmup_ratio, decay, total_steps):
    """AdamW over the trainable parameters with a linear warm-up (then linear decay to 0 with ``decay``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = math.floor(warmup_ratio * total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, warmup, decay)), params


# --------------------------------------------------------------------------------------------------
def _encode(tokenizer, examples, max_length: int) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "tokenizer has no eos_token_id: sft appends EOS to every completion so the policy learns to stop"
        )
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    completions = tokenizer([c for _, c in examples], add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        c = [*c, eos]
        if len(p) + len(c) > max_length:
            raise ValueError(
                f"examples[{i}] has {len(p)} prompt + {len(c)} completion tokens (EOS included), "
                f"over config.max_length={max_length}"
            )
        out.append((list(p), c))
    return out


def _causal_lm_parts(model):
    """The body (hidden states) and the output embedding of a causal LM, or a clear error."""
    check_pretrained("model", model)
    head = model.get_output_embeddings()
    body = model.base_model
    if head is None or getattr(head, "weight", None) is None or body is model:
        raise TypeError(
            "model must be a causal LM with an output embedding (e.g. AutoModelForCausalLM), "
            f"got {type(model).__name__}"
        )
    return body, head


def completion_nll(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens and their count.

    ``input_ids``/``attention_mask``/``labels`` ``[B, L]``; ``labels[b, t]`` is the token predicted at
    position ``t`` (i.e. ``input_ids[b, t]``) or -100. The hidden state at ``t - 1`` predicts token
    ``t``; only labelled positions go through :func:`fastppo.linear_logprobs_and_entropy`.
    """
    body, head = _causal_lm_parts(model)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logprobs, _ = fastppo.linear_logprobs_and_entropy(
        hidden[:, :-1][keep], head.weight, target[keep], bias=getattr(head, "bias", None), entropy=False
    )
    return -logprobs.sum(), int(keep.sum())


def sft(model, tokenizer, examples, *, config: SFTConfig | None = None) -> SFTResult:
    """Train ``model`` (a causal LM, in place) on ``examples`` and return the loss curve.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``); left in the train/eval mode it came in.
        tokenizer: its tokenizer; needs an EOS token (appended to every completion); a missing pad
            token is fine (padding positions are masked).
        examples: a non-empty sequence of ``(prompt, completion)`` string pairs, or of mappings with
            keys ``"prompt"`` and ``"completion"``.
        config: :class:`SFTConfig` (default: ``SFTConfig()``).

    Returns:
        :class:`SFTResult`. Deterministic on CPU given ``config.seed`` and the model's initial weights.
    """
    config = SFTConfig() if config is None else config
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    _causal_lm_parts(model)
    encoded = _encode(tokenizer, read_records("examples", examples, ("prompt", "completion")), config.max_length)
    device = next(model.parameters()).device
    fill = fill_id(tokenizer)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    opt, sched, params = make_optimizer(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        decay=config.decay,
        total_steps=config.epochs * steps_per_epoch,
    )
    result = SFTResult()
    was_training = model.training
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed)
        model.train()
        try:
            for _ in range(config.epochs):
                for rows in torch.randperm(len(encoded), generator=shuffle).split(config.batch_size):
                    batch = [encoded[i] for i in rows.tolist()]
                    ids, mask = pad_left([p + c for p, c in batch], fill, device)
                    labels, _ = pad_left([[-100] * len(p) + c for p, c in batch], -100, device)
                    nll, n = completion_nll(model, ids, mask, labels)
                    loss = nll / n
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    sched.step()
                    result.losses.append(loss.item())
                    result.tokens += n
                    result.steps += 1
        finally:
            model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result
