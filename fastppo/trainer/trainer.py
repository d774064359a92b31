"""``PPOTrainer``: the training loop, in named stages (cleanrl's ``ppo.py`` is the model).

    trainer = fastppo.PPOTrainer(config, policy, tokenizer, reward, train_prompts=..., eval_prompts=...)
    trainer.train()        # evaluate, then max_steps x (rollout, score, prepare, update, log), evaluate, save

Each :meth:`PPOTrainer.step`:

1. **rollout**: the next ``rollout_batch_size`` prompts, ``samples_per_prompt`` completions each,
   sampled by :class:`fastppo.Generator`;
2. **score**: the reward function or reward model scores each completion; shaping (missing-EOS penalty,
   running normalization, clipping);
3. **prepare**: old-policy log-probs and entropy, reference log-probs, critic values (no grad); the
   per-token KL; token rewards; advantages (gae / grpo / rloo); the KL controller's update;
4. **update**: PPO epochs over mini-batches and micro-batches (:func:`ppo_update`);
5. **log**: :meth:`_end_step`, the one place where a step ends: ``metrics.jsonl``, console, evaluation,
   callbacks (``fn(trainer, metrics)``), checkpoint.

Checkpoints (:mod:`fastppo.trainer.checkpoint`): every ``save_every`` steps, and at the step boundary
after ``should_stop`` is set (by a callback, or by SIGTERM / SIGINT with ``handle_signals``), :meth:`_end_step`
writes ``output_dir/checkpoint-<step>``: the weights of ``trainer.learner``'s modules, their optimizers
and schedulers, and :meth:`PPOTrainer.state_dict` (step, data position, every RNG, KL controller, reward
normalizer). With ``resume``, :meth:`train` loads the latest complete one and continues; the resumed
run's metrics and files equal those of the uninterrupted run. A stopped run returns from :meth:`train`
after its checkpoint, without the final evaluation and save (they come when a resumed run ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import random
import signal
import sys
import threading
import time
import warnings

import torch

from fastppo.generation import Generator
from fastppo.losses import kl_penalty
from fastppo.trainer import checkpoint, distributed
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.data import PromptSampler, read_prompts, tokenize_prompts
from fastppo.trainer.experience import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    compute_advantages,
    rollout,
    token_rewards,
)
from fastppo.trainer.loading import (
    build_critic,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    make_reward,
    max_positions,
    model_config,
    resolve_device,
)
from fastppo.trainer.metrics import Mean, step_metrics
from fastppo.trainer.models import LogProbHead, Reference, is_peft_model
from fastppo.trainer.output import NullOutput, RunOutput
from fastppo.trainer.phases import phase
from fastppo.trainer.rewards import RewardError, RewardModel, RewardShaper
from fastppo.trainer.update import Learner, NonFiniteError, make_optimizer, make_scheduler, ppo_update


class PPOTrainer:
    """PPO (or GRPO / RLOO) on a Hugging Face causal LM.

    Args:
        config: a :class:`PPOConfig` (validated here).
        policy: the causal LM, or a local folder for ``AutoModelForCausalLM.from_pretrained``.
        tokenizer: its tokenizer or folder (None: the policy's folder).
        reward: a callable ``(prompts, completions, **columns) -> scores``, ``"module:function"``, an
            ``AutoModelForSequenceClassification`` (``num_labels=1``) or its folder.
        critic: the value model (None: built per ``critic_init`` when ``advantage == "gae"``).
        ref_model: the reference policy (None: a frozen copy of the policy, or its adapters disabled under PEFT).
        train_prompts, eval_prompts: a .jsonl / .txt path, a list of strings or a list of dicts.
        reward_tokenizer: the reward model's tokenizer or folder (None: its folder's, else the policy's).
    """

    def __init__(
        self,
        config: PPOConfig | None,
        policy,
        tokenizer,
        reward,
        *,
        critic=None,
        ref_model=None,
        train_prompts,
        eval_prompts=None,
        reward_tokenizer=None,
    ):
        self.config = config = (config if config is not None else PPOConfig()).validate()
        mc, r = config.model, config.rollout
        # under torchrun: join the process group first (this rank's device, the world's batch split)
        self.dist, self.device = distributed.init_distributed(config.distributed.backend, resolve_device(mc.device))
        distributed.check_world(config, self.dist.world_size)
        world = self.dist.world_size
        self.tokenizer = load_tokenizer(tokenizer, policy if isinstance(policy, (str, pathlib.Path)) else None)
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        # data and lengths first: a prompt too long fails before any weight loads
        self.train_data = self._dataset(train_prompts)
        self.eval_data = self._dataset(eval_prompts) if eval_prompts is not None else None
        limit = config.data.max_prompt_length or max(
            d.max_length for d in (self.train_data, self.eval_data) if d is not None
        )
        positions = max_positions(model_config(policy, mc))
        if positions is not None and limit + r.max_new_tokens > positions:
            raise ValueError(
                f"max_prompt_length {limit} + max_new_tokens {r.max_new_tokens} = {limit + r.max_new_tokens} "
                f"exceeds the model's max_position_embeddings={positions}"
            )
        self.policy = load_causal_lm(policy, mc, self.device)
        disable_dropout(self.policy)
        if mc.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.head = LogProbHead(self.policy)
        self.reward = make_reward(
            reward, self.tokenizer, mc, config.reward, self.device, reward_tokenizer=reward_tokenizer
        )
        self.shaper = RewardShaper(
            clip=config.reward.reward_clip,
            missing_eos_penalty=config.reward.missing_eos_penalty,
            normalize=config.reward.normalize_reward,
        )
        k = config.kl
        self.reference = Reference(self.policy, ref_model) if (k.kl_coef > 0 or ref_model is not None) else None
        self.kl_controller = (
            AdaptiveKLController(k.kl_coef, k.kl_target, k.kl_horizon)
            if k.adaptive_kl
            else FixedKLController(k.kl_coef)
        )
        self.critic = None
        if config.ppo.advantage == "gae":
            self.critic = build_critic(critic, self.policy, self.reward, config, self.device)
            disable_dropout(self.critic)
        # the critic copies the policy or the reward model: shard or wrap only after it is built
        dc = config.distributed
        if world > 1 and self.reference is not None and dc.reference_placement == "shard":
            if self.reference.model is self.policy:
                raise ValueError("reference_placement='shard' with a PEFT policy: the reference is the policy itself")
            self.reference.head = distributed.shard(self.reference.head)
        if world > 1 and isinstance(self.reward, RewardModel) and dc.reward_model_placement == "shard":
            self.reward.model = distributed.shard_reward_model(self.reward.model)
        # under FSDP: generate with an unsharded copy, made before the policy is sharded (distributed.py)
        self.replica = None
        if world > 1 and dc.parallelism == "fsdp":
            self.replica = distributed.RolloutReplica(self.policy)
        if world > 1:
            self.head = distributed.wrap(self.head, dc.parallelism, self.device)
            if self.critic is not None:
                self.critic = distributed.wrap(self.critic, dc.parallelism, self.device)
        self.learner = self._learner()
        p = config.ppo
        # PPOAlgoConfig.keep_first_forward: where the first mini-batch is the whole batch, in one micro-batch
        self.keep_first_forward = (
            p.keep_first_forward
            and world == 1
            and p.num_minibatches == 1
            and (p.micro_batch_size is None or p.micro_batch_size >= config.minibatch_size)
        )
        self.stop_ids = None if r.ignore_eos else self._stop_ids()
        rollout_model = self.replica.model if self.replica is not None else self.policy
        # under PEFT the adapters live inside the base model's layers: generate with it directly
        self.generator = Generator(
            rollout_model.get_base_model() if is_peft_model(rollout_model) else rollout_model,
            max_batch_size=r.generation_batch_size or config.batch_size // world,
            max_length=limit + r.max_new_tokens,
            cuda_graphs="auto" if r.cuda_graphs is None else r.cuda_graphs,
        )
        seed = config.run.seed
        # one sampler for the world (every rank draws the same prompts, then takes its share)
        self.sampler = PromptSampler(len(self.train_data), r.rollout_batch_size, seed=seed, shuffle=config.data.shuffle)
        rank_seed = seed + self.dist.rank * distributed.RANK_SEED_STRIDE
        self.sample_rng = torch.Generator(device=self.device).manual_seed(rank_seed)
        self.update_rng = torch.Generator().manual_seed(rank_seed + 1)
        self.step_count = 0
        self.history: list = []
        self.callbacks: list = []  # called as fn(trainer, metrics) at the end of every step
        self.should_stop = False  # set it (a signal handler, a callback) to end train() after this step
        self.stop_reason = None  # the signal's name when a signal set should_stop
        self._kl_warned = False
        self.output = None

    @classmethod
    def from_config(cls, config: PPOConfig) -> PPOTrainer:
        """A trainer from the paths of a config (what ``fastppo train`` runs)."""
        m, d = config.model, config.data
        reward = m.reward_model if m.reward_model is not None else m.reward_fn
        return cls(config, m.model, m.tokenizer, reward, train_prompts=d.prompts, eval_prompts=d.eval_prompts)

    # ---------------------------------------------------------------------------------------------
    # setup helpers
    # ---------------------------------------------------------------------------------------------
    def _dataset(self, source):
        d = self.config.data
        prompts, columns = read_prompts(source, column=d.prompt_column)
        return tokenize_prompts(
            prompts, columns, self.tokenizer, max_length=d.max_prompt_length, truncate=d.truncate_prompts
        )

    def _stop_ids(self) -> list:
        ids = [self.tokenizer.eos_token_id]
        gen_eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        ids += list(self.config.rollout.stop_token_ids)
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _learner(self) -> Learner:
        c, p = self.config, self.config.ppo
        updates = c.run.max_steps * p.ppo_epochs * p.num_minibatches

        def pair(model, lr):
            opt = make_optimizer(model.parameters(), lr, p)
            return opt, make_scheduler(opt, kind=p.lr_scheduler, warmup_steps=p.lr_warmup_steps, total_steps=updates)

        learner = Learner(self.head, *pair(self.head, p.learning_rate))
        if self.critic is not None:
            learner.critic = self.critic
            learner.critic_optimizer, learner.critic_scheduler = pair(self.critic, c.critic.critic_learning_rate)
        return learner

    def _autocast(self):
        mode = self.config.model.mixed_precision
        bf16 = self.device.type == "cuda" and (mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()))
        if bf16:
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext

    # ---------------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------------
    def train(self) -> list:
        """Evaluate, run ``max_steps`` steps, evaluate, save; returns the metrics of the steps it ran.
        With ``resume``, first loads the latest checkpoint of ``output_dir``; a run stopped by
        ``should_stop`` returns after the checkpoint of its last step."""
        cfg = self.config.run
        notes = self._start()
        if self.dist.is_main:
            self.output = RunOutput(cfg, self.config, start_step=self.step_count)
        else:  # one rank writes the run's files; the others need to know only its last evaluation
            self.output = NullOutput()
        self.output.last_eval_step = self.dist.broadcast_object(self.output.last_eval_step)
        for note in notes:
            self.output.message(note)
        c, p = self.config, self.config.ppo
        micro = p.micro_batch_size or c.minibatch_size
        self.output.message(
            f"batch: {c.rollout.rollout_batch_size} prompts x {c.rollout.samples_per_prompt} samples = "
            f"{c.batch_size} completions -> {p.num_minibatches} mini-batches of {c.minibatch_size} (one optimizer "
            f"step each) -> micro-batches of {micro}; {p.ppo_epochs} epochs; {cfg.max_steps} steps"
        )
        if self.dist.world_size > 1:
            w = self.dist.world_size
            self.output.message(
                f"{w} ranks ({c.distributed.parallelism}): {c.batch_size // w} completions each per step"
            )
        self.should_stop, self.stop_reason = False, None
        try:
            with self._signals():
                if self.step_count == 0:
                    self.evaluate()
                    last_eval = 0
                else:
                    last_eval = self.output.last_eval_step
                while self.step_count < cfg.max_steps and not self.should_stop:
                    metrics = self.step()
                    if self._end_step(metrics):
                        last_eval = self.step_count
            if self.step_count < cfg.max_steps:
                by = f" by {self.stop_reason}" if self.stop_reason else ""
                where = f"checkpoint saved to {self._saved}" if self.step_count else "nothing to save"
                self.output.message(f"stopped{by} after step {self.step_count}: {where}; continue with --resume")
                return self.history
            if last_eval != self.step_count:
                self.evaluate()
            if cfg.save_final:
                self.save(pathlib.Path(cfg.output_dir) / "final")
        finally:
            self.output.close()
        return self.history

    def _start(self) -> list:
        """Before a run's files open: resume from the latest checkpoint, or clear a fresh run's folder of
        the checkpoints of an earlier run (they would be taken for this run's). Returns messages."""
        cfg = self.config.run
        self._saved = None
        if self.step_count:  # state loaded by the caller, or a second train() call: just continue
            return []
        if cfg.resume:
            folder = checkpoint.latest_checkpoint(cfg.output_dir)
            if folder is None:
                return [f"resume: no checkpoint in {cfg.output_dir}; starting at step 0"]
            changes = checkpoint.config_changes(folder, self.config)
            notes = self._load(folder)
            self._saved = folder
            notes = [f"resumed from {folder} (step {self.step_count})", *notes]
            return notes + ([f"resume: config changed since the checkpoint: {'; '.join(changes)}"] if changes else [])
        self.dist.barrier()  # every rank has checked the folder before rank 0 clears it
        removed = checkpoint.remove_checkpoints(cfg.output_dir) if self.dist.is_main else []
        self.dist.barrier()
        if not removed:
            return []
        names = ", ".join(p.name for p in removed)
        return [f"new run in {cfg.output_dir}: removed an earlier run's checkpoints ({names}); --resume continues one"]

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM and SIGINT set ``should_stop`` (a second SIGINT raises KeyboardInterrupt), for the
        duration of the run; only in the main thread, and only with ``handle_signals``."""
        if not self.config.run.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.should_stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.should_stop, self.stop_reason = True, self.stop_reason or name
            print(f"fastppo: {name}: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def save_checkpoint(self) -> pathlib.Path:
        """Write ``output_dir/checkpoint-<step>`` now (atomically; keeps the newest ``keep_last``); under
        torchrun every rank calls it (a sharded checkpoint, :mod:`fastppo.trainer.dist_checkpoint`)."""
        if self.output is not None:
            self.output.sync()
        keep = self.config.run.keep_last
        if self.dist.enabled:
            from fastppo.trainer import dist_checkpoint

            self._saved = dist_checkpoint.save_checkpoint(self, keep_last=keep)
        else:
            self._saved = checkpoint.save_checkpoint(self, keep_last=keep)
        return self._saved

    def _load(self, folder) -> list:
        """Restore the state of a checkpoint folder; returns notes for the console."""
        if self.dist.enabled:
            from fastppo.trainer import dist_checkpoint

            return dist_checkpoint.load_checkpoint(self, folder)
        checkpoint.load_checkpoint(self, folder)
        return []

    def step(self) -> dict:
        """One rollout batch and its PPO update; returns the step's metrics (see fastppo.trainer.metrics)."""
        times, t0 = {}, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with phase("step"):
            with _timer(times, "rollout", self.device), phase("gen"):
                indices = self.sampler.next()[self.dist.share(self.config.rollout.rollout_batch_size)]
                roll = self._rollout(
                    indices, self.sample_rng, do_sample=True, samples=self.config.rollout.samples_per_prompt
                )
            with _timer(times, "score", self.device), phase("reward"):
                scores, components = self._score(roll)
            with _timer(times, "prepare", self.device):
                exp, info = self._prepare(roll, scores)
            with _timer(times, "train", self.device):
                meter = self._update(exp, info["kl_coef"])
        times["step"] = time.perf_counter() - t0
        self.step_count += 1
        return self._metrics(roll, scores, components, exp, info, meter, times)

    def _rollout(self, indices, rng, *, do_sample, samples, data=None):
        r = self.config.rollout
        sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        with torch.no_grad(), self._autocast()():
            return rollout(
                self.generator,
                self.tokenizer,
                data or self.train_data,
                indices,
                samples_per_prompt=samples,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                rng=rng,
                do_sample=do_sample,
                **sampling,
            )

    def _score(self, roll, data=None):
        """``(scores [B] float32 CPU, {component: [B]})`` of a rollout."""
        if isinstance(self.reward, RewardModel):
            data = data or self.train_data
            texts = [p + c for p, c in zip(roll.prompts, roll.completions)]
            ids = [data.ids[i] + c for i, c in zip(roll.prompt_index, roll.completion_ids)]
            scores, components = self.reward(texts, ids), {}
            if not bool(torch.isfinite(scores).all()):
                i = int((~torch.isfinite(scores)).nonzero()[0])
                raise RewardError(f"the reward model returned {scores[i].item()} for text {texts[i]!r}")
            return scores, components
        return self.reward(roll.prompts, roll.completions, roll.columns)

    @torch.no_grad()
    def _prepare(self, roll, scores):
        """Old-policy, reference and critic passes over ``roll`` (in micro-batches), then the advantages
        of the ``scores`` [B] once shaped: the :class:`Experience` of the update and its metrics."""
        cfg = self.config
        seq, attn, cmask, P = roll.sequences, roll.attention_mask, roll.completion_mask, roll.prompt_length
        n = cfg.ppo.micro_batch_size or len(seq)
        chunks = [((seq[i : i + n], attn[i : i + n], P), cmask[i : i + n]) for i in range(0, len(seq), n)]
        temperature = cfg.rollout.temperature
        ref = values = None
        live = {}  # the forwards kept with their graphs for the update (PPOAlgoConfig.keep_first_forward)
        keep_policy = self.keep_first_forward and not self._critic_warmup()
        with self._autocast()():
            if cfg.rollout.reuse_rollout_logprobs:  # the Generator's (0 past a row's end, as the head's)
                lp, ent = roll.rollout_logprobs, torch.full_like(roll.rollout_logprobs, float("nan"))
            else:
                with phase("old_log_prob"):
                    if keep_policy:
                        with _training(self.head):
                            live["live_logprobs"], live["live_entropy"] = self.head(
                                seq, attn, P, completion_mask=cmask, temperature=temperature
                            )
                        lp, ent = live["live_logprobs"].detach(), live["live_entropy"].detach()
                    else:
                        out = [self.head(*a, completion_mask=m, temperature=temperature) for a, m in chunks]
                        lp, ent = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
            if self.reference is not None:
                with phase("ref"):
                    parts = [self.reference.logprobs(*a, completion_mask=m, temperature=temperature) for a, m in chunks]
                    ref = torch.cat(parts)
            if self.critic is not None:
                with phase("values"):
                    if self.keep_first_forward:
                        with _training(self.critic):
                            live["live_values"] = self.critic(seq, attn, P)
                        values = live["live_values"].detach()
                    else:
                        values = torch.cat([self.critic(*a) for a, _ in chunks])
        with phase("adv"):
            exp, info = self._advantages(roll, scores, lp, ent, ref, values)
        return dataclasses.replace(exp, **live), info

    def _critic_warmup(self) -> bool:
        """Whether this step trains only the critic (``critic_warmup_steps``)."""
        return self.step_count < self.config.critic.critic_warmup_steps

    def _advantages(self, roll, scores, lp, ent, ref, values):
        cfg, dist = self.config, self.dist
        shaped = self._shape(scores, roll.ended)
        seq, attn, cmask, P = roll.sequences, roll.attention_mask, roll.completion_mask, roll.prompt_length
        kl = kl_penalty(lp, ref, kind=cfg.kl.kl_estimator, mask=cmask) if ref is not None else None
        coef = self.kl_controller.value
        in_reward = kl if cfg.kl.kl_mode == "reward" else None
        rewards = token_rewards(shaped, cmask, in_reward, coef)
        adv, returns = compute_advantages(
            cfg.ppo.advantage,
            rewards,
            cmask,
            values=values,
            gamma=cfg.ppo.gamma,
            lam=cfg.ppo.lam,
            group_size=cfg.rollout.samples_per_prompt,
            whiten=cfg.whiten,
            dist=dist,
        )
        entropy = distributed.masked_mean(ent, cmask, dist)
        kl_mean = distributed.masked_mean(kl, cmask, dist) if kl is not None else torch.zeros((), device=self.device)
        info = dict(rewards=rewards, entropy=entropy, kl=kl_mean, kl_coef=coef, logprobs=lp)
        self.kl_controller.update(float(kl_mean), len(seq) * dist.world_size)
        exp = Experience(seq, attn, cmask, P, lp, adv, ref_logprobs=ref, values=values, returns=returns)
        return exp, info

    def _shape(self, scores: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """The shaped scores of this rank's completions; under torchrun, shaped with the whole batch
        (the running normalizer sees every rank's scores, so its state is the same on all ranks)."""
        if self.dist.enabled:
            scores = self.dist.gather(scores.to(self.device)).cpu()
            ended = self.dist.gather(ended.to(self.device))
        shaped = self.shaper(scores, ended.cpu()).to(self.device)
        return shaped[self.dist.share(len(shaped))]

    def _update(self, exp, kl_coef: float) -> Mean:
        meter = Mean(self.device)
        warm = self._critic_warmup()
        meter.add("lr", self.learner.policy_optimizer.param_groups[0]["lr"])
        if self.learner.critic_optimizer is not None:
            meter.add("critic_lr", self.learner.critic_optimizer.param_groups[0]["lr"])
        self.policy.train(), self.critic is not None and self.critic.train()
        try:
            ppo_update(
                exp,
                self.learner,
                self.config,
                rng=self.update_rng,
                meter=meter,
                step=self.step_count,
                train_policy=not warm,
                kl_coef=kl_coef,
                autocast=self._autocast(),
                dist=self.dist,
            )
        finally:
            self.policy.eval(), self.critic is not None and self.critic.eval()
        if self.replica is not None:
            self.replica.refresh(self.policy)
        return meter

    def _metrics(self, roll, scores, components, exp, info, meter, times) -> dict:
        return step_metrics(
            self.step_count, roll, scores, components, exp, info, meter, times, self.device, dist=self.dist
        )

    def _end_step(self, metrics: dict) -> bool:
        """The one place where a step ends: check, record, show, evaluate, run the callbacks, checkpoint.
        Returns whether it evaluated. A non-finite metric raises before anything is written: the last
        checkpoint stays the last good state. Under torchrun the metrics are global, so every rank takes
        the same decisions; a stop request on any rank stops all of them after this step."""
        self.should_stop = self.dist.any(self.should_stop, self.device)
        for name in ("reward_mean", "policy_loss", "value_loss", "grad_norm"):
            if not (metrics[name] == metrics[name] and abs(metrics[name]) != float("inf")):
                raise NonFiniteError(f"step {metrics['step']}: {name} is {metrics[name]}; stopping the run")
        self.history.append(metrics)
        self.output.step(metrics)
        budget = self.config.kl.kl_budget
        if budget is not None and metrics["kl"] > budget and not self._kl_warned:
            self._kl_warned = True
            msg = (
                f"step {metrics['step']}: kl {metrics['kl']:.4f} per token passed kl_budget={budget}: the policy "
                "is far from the reference; check samples for reward hacking (or raise kl_coef)"
            )
            warnings.warn(msg, stacklevel=3)  # points at the caller of train()
        every = self.config.run.eval_every
        evaluated = bool(every) and metrics["step"] % every == 0 and metrics["step"] < self.config.run.max_steps
        if evaluated:
            self.evaluate()
        for callback in self.callbacks:
            callback(self, metrics)
        save_every = self.config.run.save_every
        if (save_every and metrics["step"] % save_every == 0) or self.should_stop:
            self.save_checkpoint()
        return evaluated

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Complete every eval prompt once (greedy with ``eval_greedy``, else sampled from a fixed seed, so
        evaluations compare) and score it; writes ``eval.jsonl`` and ``samples.jsonl`` when training.
        Returns ``{"step", "eval_reward_mean", "eval_reward_std", "eval_response_length_mean", ...}``
        (``eval_reward_mean``: the raw score, before shaping and KL); ``{}`` without eval prompts."""
        data = self.eval_data
        if data is None:
            return {}
        dist = self.dist
        rng = torch.Generator(device=self.device).manual_seed(self.config.run.seed + 1_000_003 + dist.rank)
        width = self.generator.max_batch_size
        # under torchrun each rank takes every world_size-th prompt; ranks short of a full share repeat
        # their last prompt (dropped below), so that all run the same number of (sharded) forwards
        share = list(range(dist.rank, len(data), dist.world_size))
        rounds = -(-len(data) // dist.world_size)
        mine = (share + share[-1:] * rounds)[:rounds] if share else [0] * rounds
        scores, lengths, samples, parts = [], [], [], {}
        for i in range(0, len(mine), width):
            roll = self._rollout(
                mine[i : i + width], rng, do_sample=not self.config.run.eval_greedy, samples=1, data=data
            )
            s, comps = self._score(roll, data)
            scores.append(s), lengths.append(roll.completion_mask.sum(-1).float().cpu())
            for k, v in comps.items():
                parts.setdefault(k, []).append(v)
            samples += [
                {"index": j, "prompt": p, "completion": c, "reward": float(x)}
                for j, p, c, x in zip(mine[i : i + width], roll.prompts, roll.completions, s.tolist())
            ]
        keep = len(share)
        scores, lengths = torch.cat(scores)[:keep], torch.cat(lengths)[:keep]
        parts = {k: torch.cat(v)[:keep] for k, v in parts.items()}
        samples = samples[:keep]
        if dist.enabled:  # every rank's share, back in prompt order
            mine = (scores.tolist(), lengths.tolist(), {k: v.tolist() for k, v in parts.items()}, samples)
            gathered = dist.gather_objects(mine)
            samples = [x for g in gathered for x in g[3]]
            order = sorted(range(len(samples)), key=lambda n: samples[n]["index"])
            samples = [samples[n] for n in order]
            scores = torch.tensor([x for g in gathered for x in g[0]])[order]
            lengths = torch.tensor([x for g in gathered for x in g[1]])[order]
            parts = {k: torch.tensor([x for g in gathered for x in g[2][k]])[order] for k in parts}
        samples = [{"step": self.step_count, **{k: v for k, v in x.items() if k != "index"}} for x in samples]
        record = {
            "step": self.step_count,
            "eval_reward_mean": scores.mean().item(),
            "eval_reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "eval_response_length_mean": lengths.mean().item(),
            **{f"eval_reward/{k}": v.mean().item() for k, v in parts.items()},
        }
        if self.output is not None:
            self.output.evaluation(record, samples)
        return record

    def save(self, path) -> pathlib.Path:
        """The policy and its tokenizer as a ``save_pretrained`` folder (``from_pretrained`` loads it;
        a PEFT policy saves its adapters)."""
        path = pathlib.Path(path)
        if self.dist.is_main:  # under FSDP the rollout replica holds the full, current weights
            (self.replica.model if self.replica is not None else self.policy).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        self.dist.barrier()
        return path

    # ---------------------------------------------------------------------------------------------
    # state (what a checkpoint holds besides the weights, optimizers and schedulers of self.learner)
    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step, data position, every RNG, the KL controller and the reward normalizer: with
        ``self.learner``'s modules, optimizers and schedulers, what a resumed run needs."""
        return {
            "step": self.step_count,
            "sampler": self.sampler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_shaper": self.shaper.state_dict(),
            "kl_warned": self._kl_warned,
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "sample": self.sample_rng.get_state(),
                "update": self.update_rng.get_state(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.shaper.load_state_dict(state["reward_shaper"])
        self._kl_warned = bool(state.get("kl_warned", False))
        rng = state["rng"]
        random.setstate(rng["python"])
        _set_numpy_rng_state(rng.get("numpy"))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sample_rng.set_state(rng["sample"])
        self.update_rng.set_state(rng["update"])


def _numpy_rng_state():
    """numpy's global RNG state as plain lists (None when numpy was never imported: nothing drew from it)."""
    if "numpy" not in sys.modules:
        return None
    name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_rng_state(state) -> None:
    if state is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def _training(module: torch.nn.Module):
    """A forward of prepare run as the update runs it: with gradient, in train mode (its graph is kept)."""
    module.train()
    try:
        with torch.enable_grad():
            yield
    finally:
        module.eval()


@contextlib.contextmanager
def _timer(times: dict, name: str, device: torch.device):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":  # the stage's kernels are in its time, not the next one's
            torch.cuda.synchronize(device)
        times[name] = time.perf_counter() - t0
