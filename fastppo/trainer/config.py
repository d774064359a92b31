"""The trainer's configuration: :class:`PPOConfig`, made of flat, typed sections.

Each section is a flat dataclass whose field names are unique across sections, so that every field is
one unprefixed command-line flag (``max_new_tokens`` is ``--max-new-tokens``) and one key of
``config.yaml`` (nested by section, or flat). The docstring under each field is its ``--help`` text.
Defaults follow TRL / OpenRLHF / verl where they agree (clip 0.2, value clip 0.2, lambda 0.95,
gamma 1, k1 KL in the reward with coefficient 0.05, a separate critic learning rate).

:meth:`PPOConfig.validate` checks every field's type and range and the consistency between fields
(batch sizes that divide, ``samples_per_prompt > 1`` for grpo/rloo, ...), so that a bad value fails
before any model loads, with the field's name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fastppo._checks import check_bool, check_choice, check_number


@dataclass
class ModelConfig:
    _argument_group_name: ClassVar[str] = "model"
    _bounds: ClassVar[dict] = {}

    model: str | None = None
    """Policy: a local folder that AutoModelForCausalLM.from_pretrained loads (None: the built-in tiny demo)."""
    tokenizer: str | None = None
    """Tokenizer folder of the policy (None: the model folder)."""
    reward_model: str | None = None
    """Reward model: a local AutoModelForSequenceClassification folder (num_labels=1)."""
    reward_tokenizer: str | None = None
    """Tokenizer of the reward model (None: the reward model's folder if it has one, else the policy's)."""
    reward_fn: str | None = None
    """Reward function 'module:function' or 'file.py:function', called as fn(prompts, completions, **columns)."""
    critic_model: str | None = None
    """Folder of the value model's backbone (None: chosen by critic_init)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the models' weights are loaded in ('auto': as saved). float32 master weights are the safe choice."""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """Autocast of the training forwards: 'auto' is bf16 on a CUDA device that supports it, none on CPU."""
    trust_remote_code: bool = False
    """Allow from_pretrained to run code shipped with a model folder."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention of the loaded models ('auto': flash-attn on CUDA when installed, else SDPA)."""
    gradient_checkpointing: bool = False
    """Recompute the activations in the backward (less memory, about 30% more compute)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""


@dataclass
class DataConfig:
    _argument_group_name: ClassVar[str] = "data"
    _bounds: ClassVar[dict] = {"max_prompt_length": dict(ge=1)}

    prompts: str | None = None
    """Training prompts: .jsonl (a 'prompt' field; other fields go to the reward function) or .txt (one a line)."""
    eval_prompts: str | None = None
    """Held-out prompts for evaluation, same formats (none: no evaluation)."""
    prompt_column: str = "prompt"
    """Name of the prompt field in .jsonl files."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens (None: the longest of the data); a longer prompt is an error unless truncate_prompts."""
    truncate_prompts: bool = False
    """Cut prompts longer than max_prompt_length from the left (their end is kept) instead of failing."""
    shuffle: bool = True
    """Visit the training prompts in a new random order every epoch (else in file order)."""


@dataclass
class RolloutConfig:
    _argument_group_name: ClassVar[str] = "rollout"
    _bounds: ClassVar[dict] = {
        "rollout_batch_size": dict(ge=1),
        "samples_per_prompt": dict(ge=1),
        "max_new_tokens": dict(ge=1),
        "temperature": dict(gt=0),
        "top_k": dict(ge=0),
        "top_p": dict(gt=0, le=1),
        "generation_batch_size": dict(ge=1),
    }

    rollout_batch_size: int = 16
    """Prompts per step; a step rolls out rollout_batch_size * samples_per_prompt completions."""
    samples_per_prompt: int = 1
    """Completions sampled per prompt (> 1 for grpo and rloo, whose baseline is the prompt's group)."""
    max_new_tokens: int = 64
    """Longest completion in tokens; a stop token ends one earlier."""
    temperature: float = 1.0
    """Sampling temperature; the training log-probs use the same one."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    ignore_eos: bool = False
    """Never stop early: every completion has max_new_tokens tokens (for benchmarks)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a completion, besides the tokenizer's and the generation config's EOS."""
    cuda_graphs: bool | None = None
    """CUDA-graph the decode step (None: on for CUDA models)."""
    generation_batch_size: int | None = None
    """Rows per Generator batch (None: the whole rollout at once; larger rollouts go in chunks of this)."""
    reuse_rollout_logprobs: bool = False
    """Take the Generator's log-probs as the old policy's (prepare skips that policy forward, as TRL does): the
    same in fp32 on one device (~1e-6 apart: rollout_logprob_diff before switching it on), bf16 rounding apart
    under autocast; the entropy metric is NaN then (no forward computes it)."""


@dataclass
class RewardConfig:
    _argument_group_name: ClassVar[str] = "reward"
    _bounds: ClassVar[dict] = {"reward_clip": dict(gt=0), "reward_batch_size": dict(ge=1)}

    reward_clip: float | None = None
    """Clip each sequence's score to [-c, c] after the other shaping (OpenRLHF: 10; None: off)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion that ends without a stop token (TRL's; None: off)."""
    normalize_reward: bool = False
    """Whiten the scores by a running mean and std over all steps so far (before clipping)."""
    reward_batch_size: int | None = None
    """Rows per reward-model forward (None: all at once)."""


@dataclass
class KLConfig:
    _argument_group_name: ClassVar[str] = "kl"
    _bounds: ClassVar[dict] = {
        "kl_coef": dict(ge=0),
        "kl_target": dict(gt=0),
        "kl_horizon": dict(gt=0),
        "kl_budget": dict(gt=0),
    }

    kl_coef: float = 0.05
    """Weight of the KL to the reference policy (initial value when adaptive). 0 skips the reference model."""
    kl_estimator: Literal["k1", "abs", "k2", "k3"] = "k1"
    """Per-token KL estimator (fastppo.kl_penalty): k1 = log p - log p_ref, k3 = exp(-d) + d - 1, ..."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """Where the KL goes: 'reward' (-kl_coef * KL on every token's reward) or 'loss' (+kl_coef * KL, policy loss)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019): coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon."""
    kl_target: float = 0.1
    """Target of the adaptive controller for the 'kl' metric (mean KL per completion token)."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive controller, in completions."""
    kl_budget: float | None = 1.0
    """Warn when the mean KL per token passes this (a reward-hacking monitor; None: never)."""


@dataclass
class PPOAlgoConfig:
    _argument_group_name: ClassVar[str] = "ppo"
    _bounds: ClassVar[dict] = {
        "gamma": dict(ge=0, le=1),
        "lam": dict(ge=0, le=1),
        "ppo_epochs": dict(ge=1),
        "num_minibatches": dict(ge=1),
        "micro_batch_size": dict(ge=1),
        "learning_rate": dict(gt=0),
        "lr_warmup_steps": dict(ge=0),
        "weight_decay": dict(ge=0),
        "adam_beta1": dict(ge=0, lt=1),
        "adam_beta2": dict(ge=0, lt=1),
        "adam_eps": dict(gt=0),
        "max_grad_norm": dict(gt=0),
        "clip_low": dict(gt=0, lt=1),
        "clip_high": dict(gt=0),
        "dual_clip": dict(gt=1),
        "ent_coef": dict(ge=0),
        "target_kl": dict(gt=0),
    }

    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """Advantage estimator: 'gae' with the critic, or critic-free 'grpo' / 'rloo' over each prompt's samples."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """Whiten the advantages over the batch (None: yes for gae, no for grpo/rloo, as their papers)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Mini-batches per epoch, one optimizer step each."""
    micro_batch_size: int | None = None
    """Rows per forward/backward (gradient accumulation; None: the whole mini-batch). Never changes the gradient."""
    keep_first_forward: bool = True
    """With one mini-batch and no micro-batching (one process): prepare's policy and critic forwards keep
    their graphs and are the first update's forwards (one forward of each model saved per step; its
    ratio is exactly 1). Costs memory: both models' activations are held from prepare to the update."""
    learning_rate: float = 1e-6
    """AdamW learning rate of the policy."""
    lr_scheduler: Literal["constant", "linear"] = "constant"
    """After the warm-up: constant, or linear decay to 0 at the last optimizer step."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up from 0 (policy and critic)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm of the policy and of the critic, each, to this (None: no clipping)."""
    clip_low: float = 0.2
    """PPO ratio clip: the ratio is kept above 1 - clip_low."""
    clip_high: float | None = None
    """Upper ratio clip 1 + clip_high (None: clip_low; DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (verl/OpenRLHF use 3; None: off)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus in the policy loss."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses are averaged over a mini-batch (see fastppo.policy_loss)."""
    target_kl: float | None = None
    """Stop the step's remaining PPO epochs once a mini-batch's approx_kl passes this (None: never)."""


@dataclass
class CriticConfig:
    _argument_group_name: ClassVar[str] = "critic"
    _bounds: ClassVar[dict] = {
        "critic_learning_rate": dict(gt=0),
        "vf_coef": dict(gt=0),
        "vf_clip": dict(gt=0),
        "critic_warmup_steps": dict(ge=0),
    }

    critic_init: Literal["auto", "reward", "policy"] = "auto"
    """Value model backbone: a copy of the reward model's (its head too) or of the policy's (head zero);
    'auto': the reward model's when it shares the policy's tokenizer, else the policy's."""
    critic_learning_rate: float = 1e-5
    """AdamW learning rate of the critic (verl and OpenRLHF use 10x the actor's)."""
    vf_coef: float = 0.5
    """Scale of the value loss (the critic has its own optimizer: this matters through gradient clipping)."""
    vf_clip: float | None = 0.2
    """Value clipping around the rollout's values (None: off)."""
    critic_warmup_steps: int = 0
    """First steps that train only the critic, the policy frozen (verl's critic_warmup)."""


@dataclass
class RunConfig:
    _argument_group_name: ClassVar[str] = "run"
    _bounds: ClassVar[dict] = {
        "max_steps": dict(ge=0),
        "eval_every": dict(ge=0),
        "log_every": dict(ge=1),
        "save_every": dict(ge=0),
        "keep_last": dict(ge=1),
    }

    output_dir: str = "fastppo_output"
    """Folder of config.yaml, metrics.jsonl, eval.jsonl, samples.jsonl, checkpoints and the final policy."""
    max_steps: int = 100
    """Training steps (rollout + update)."""
    seed: int = 0
    """Seeds the prompt order, the sampling and the mini-batch order."""
    eval_every: int = 10
    """Evaluate every this many steps, besides before the first and after the last (0: only those two)."""
    eval_greedy: bool = False
    """Greedy completions at evaluation (else sampled as in training, from a fixed seed)."""
    log_every: int = 1
    """Print a line of metrics every this many steps (when the progress bar is off)."""
    progress_bar: bool = True
    """Show a progress bar with live reward, KL and tokens/s (only on a terminal)."""
    tensorboard: bool = False
    """Also write TensorBoard events into output_dir (needs the tensorboard package)."""
    save_every: int = 50
    """Write a checkpoint (output_dir/checkpoint-STEP: weights, optimizers, RNGs, ...) every this many steps
    (0: only when the run is stopped early, e.g. by SIGTERM)."""
    keep_last: int | None = 2
    """Checkpoints kept: the newest ones (None: all); older ones are deleted once a new one is complete."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir (none: start at step 0). Without it, a run
    starts the folder over: its files and checkpoints are replaced."""
    handle_signals: bool = True
    """On SIGTERM or SIGINT, finish the current step, write a checkpoint and stop (a second SIGINT stops at once)."""
    save_final: bool = True
    """Save the final policy (save_pretrained) and tokenizer into output_dir/final."""


@dataclass
class DistributedConfig:
    _argument_group_name: ClassVar[str] = "distributed"
    _bounds: ClassVar[dict] = {}

    parallelism: Literal["fsdp", "ddp"] = "fsdp"
    """Under torchrun: 'fsdp' shards the policy and critic with FSDP2 (fully_shard per decoder layer) and rolls
    out on an unsharded replica per rank; 'ddp' replicates them with DistributedDataParallel."""
    reference_placement: Literal["replicate", "shard"] = "replicate"
    """Under torchrun: the frozen reference policy as a full copy on every rank, or sharded with FSDP2."""
    reward_model_placement: Literal["replicate", "shard"] = "replicate"
    """Under torchrun: the reward model as a full copy on every rank, or sharded with FSDP2."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend ('auto': nccl on CUDA, gloo on CPU)."""


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "kl": KLConfig,
    "ppo": PPOAlgoConfig,
    "critic": CriticConfig,
    "run": RunConfig,
    "distributed": DistributedConfig,
}


@dataclass
class PPOConfig:
    """Everything a run needs, by section. ``PPOConfig.from_dict({"rollout": {"max_new_tokens": 32}})``,
    or ``PPOConfig.from_dict({"max_new_tokens": 32})`` (flat keys find their section)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> PPOConfig:
        """From a nested ``{section: {field: value}}`` and/or flat ``{field: value}`` dict; unknown keys raise."""
        nested = {name: {} for name in SECTIONS}
        owner = field_owners()
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                for k, v in value.items():
                    if owner.get(k) != key:
                        raise ValueError(f"unknown config field {key}.{k}{_close(k)}")
                    nested[key][k] = v
            elif key in owner:
                nested[owner[key]][key] = value
            else:
                raise ValueError(f"unknown config field {key!r}{_close(key)}")
        return cls(**{name: SECTIONS[name](**kw) for name, kw in nested.items()})

    def to_dict(self) -> dict:
        """Nested ``{section: {field: value}}`` (what ``config.yaml`` holds)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_yaml(cls, path) -> PPOConfig:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of fields, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_yaml(self, path) -> None:
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ---------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Completions per step: ``rollout_batch_size * samples_per_prompt``."""
        return self.rollout.rollout_batch_size * self.rollout.samples_per_prompt

    @property
    def minibatch_size(self) -> int:
        """Completions per optimizer step: ``batch_size / num_minibatches``."""
        return self.batch_size // self.ppo.num_minibatches

    @property
    def whiten(self) -> bool:
        """Whether the advantages are whitened (``whiten_advantages``, resolved)."""
        w = self.ppo.whiten_advantages
        return self.ppo.advantage == "gae" if w is None else w

    def validate(self) -> PPOConfig:
        """Check every field's type and range, then the consistency between fields; returns self."""
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise TypeError(f"PPOConfig.{name} must be a {cls.__name__}, got {type(section).__name__}")
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                _check_field(f.name, getattr(section, f.name), hints[f.name], cls._bounds.get(f.name, {}))
        r, p = self.rollout, self.ppo
        if p.advantage in ("grpo", "rloo") and r.samples_per_prompt < 2:
            raise ValueError(
                f"advantage={p.advantage!r} needs samples_per_prompt >= 2 (the baseline is the other samples "
                f"of a prompt), got {r.samples_per_prompt}"
            )
        if self.batch_size % p.num_minibatches:
            raise ValueError(
                f"num_minibatches={p.num_minibatches} must divide rollout_batch_size * samples_per_prompt = "
                f"{r.rollout_batch_size} * {r.samples_per_prompt} = {self.batch_size}"
            )
        if p.micro_batch_size is not None and self.minibatch_size % p.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={p.micro_batch_size} must divide the mini-batch size "
                f"{self.batch_size} / num_minibatches {p.num_minibatches} = {self.minibatch_size}"
            )
        if len(r.stop_token_ids) > 7:  # the Generator takes 8 stop ids, and the tokenizer's EOS is one
            raise ValueError(f"stop_token_ids: at most 7 extra stop tokens, got {len(r.stop_token_ids)}")
        if r.ignore_eos and self.reward.missing_eos_penalty is not None:
            raise ValueError("missing_eos_penalty with ignore_eos=True would penalize every completion")
        if self.critic.critic_warmup_steps and p.advantage != "gae":
            raise ValueError(f"critic_warmup_steps needs advantage='gae' (there is no critic with {p.advantage!r})")
        m = self.model
        if m.reward_model is not None and m.reward_fn is not None:
            raise ValueError("give one of reward_model and reward_fn, not both")
        if m.model is not None:
            if self.data.prompts is None:
                raise ValueError("prompts is required with model (a .jsonl or .txt file of training prompts)")
            if m.reward_model is None and m.reward_fn is None:
                raise ValueError("a reward is required with model: give reward_model DIR or reward_fn module:function")
        return self


# --------------------------------------------------------------------------------------------------
# field documentation and checks
# --------------------------------------------------------------------------------------------------
@functools.cache
def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field of the dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def field_owners() -> dict[str, str]:
    """``{field: section}`` over all sections (field names are unique across sections)."""
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owners:
                raise AssertionError(f"config field {f.name} is in sections {owners[f.name]} and {section}")
            owners[f.name] = section
    return owners


def _close(name: str) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(field_owners()), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _check_field(name: str, value, hint, bounds: dict) -> None:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is Literal:
        check_choice(name, value, typing.get_args(hint))
    elif hint is bool:
        check_bool(name, value)
    elif hint in (int, float):
        check_number(name, value, integer=hint is int, **bounds)
    elif hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check_number(f"{name}[{i}]", v, integer=True, ge=0)
    else:  # pragma: no cover - a new field type must get a check here
        raise AssertionError(f"no check for field {name} of type {hint}")
