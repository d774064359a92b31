"""The built-in demo: a miniature of the whole RLHF loop on a tiny model, in about two minutes on a CPU.

    fastppo train                                   # the demo through the trainer's command line
    fastppo train --max-steps 20 --output-dir out   # any PPOConfig flag changes its PPO stage
    python -m fastppo.demo [--iterations 40] [--sft-examples 800] [--rm-pairs 4000] [--help]

Nothing is downloaded: the policy and the reward model are tiny Qwen2 models built from a config with
a char-level tokenizer made in code (:mod:`fastppo.tiny`). The task (:mod:`fastppo.trainer.demo_task`)
is *sort the letters of a word* (``"sort dbca: "`` -> ``"abcd"``), whose true score (edit similarity to
the answer) we can compute, so the demo shows what RLHF optimises and what it is meant to achieve:

1. **SFT warm-up** (:func:`fastppo.trainer.sft.sft`) of the random policy on demonstrations: it learns
   the format and part of the skill;
2. **reward model** (:func:`fastppo.trainer.reward_model.train_reward_model`): a tiny
   ``Qwen2ForSequenceClassification`` (``num_labels=1``) trained with the Bradley–Terry loss on
   synthetic preference pairs; its held-out pair accuracy is reported. It never sees the rule;
3. **PPO** (:class:`fastppo.PPOTrainer`) of the warm-up policy against the reward model's score, with a
   KL penalty to the frozen warm-up policy (the reference) and a critic initialised from the reward model;
4. **evaluation** on held-out prompts (letter sets never seen in training) by the true score and by the
   reward model's score, before and after PPO, with sample completions.

The run's files (``metrics.jsonl``, ``eval.jsonl``, ``samples.jsonl``, the final model) go to
``output_dir``, and ``plot.png`` when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import tempfile
import time

from fastppo.trainer import demo_task as task

# The demo's values of PPOConfig fields (``fastppo train`` without --model starts from these; flags override)
PRESET = dict(
    rollout_batch_size=64,
    max_new_tokens=task.MAX_NEW_TOKENS,
    ppo_epochs=2,
    num_minibatches=2,
    learning_rate=3e-4,
    critic_learning_rate=3e-4,
    kl_coef=0.02,
    normalize_reward=True,
    missing_eos_penalty=1.0,
    max_steps=40,
    eval_every=10,
    output_dir="fastppo_demo",
)


@dataclasses.dataclass
class DemoSizes:
    """The sizes of the stages other than PPO (whose sizes are PPOConfig's)."""

    sft_examples: int = 800
    """Demonstrations for the warm-up (one epoch): few enough that PPO has room to improve."""
    sft_lr: float = 3e-3
    """Peak learning rate of the warm-up."""
    rm_pairs: int = 4000
    """Preference pairs for the reward model (one epoch)."""
    rm_eval_pairs: int = 500
    """Held-out preference pairs (eval letter sets) for the reward model's pair accuracy."""
    rm_lr: float = 1e-3
    """Peak learning rate of the reward model."""
    rm_from_policy: bool = False
    """Initialise the reward model from the warm-up policy (its body, and a zero scalar head), as InstructGPT
    does: it starts out knowing the task's text; else from random weights."""
    train_prompts: int = 512
    """PPO's training prompts."""
    eval_prompts: int = 64
    """Held-out prompts for the before / after evaluation."""
    samples_shown: int = 4
    """Sample completions printed before and after PPO."""


def _evaluate(policy, tok, rm, prompts, seed) -> dict:
    from fastppo.trainer.reward_model import score_texts

    result = task.evaluate_policy(policy, tok, prompts, seed=seed)
    result["rm_score"] = score_texts(rm, tok, prompts, result["completions"]).mean().item()
    return result


def pipeline(config, sizes: DemoSizes | None = None, *, log=print) -> dict:
    """Run the four stages with ``config`` (a :class:`PPOConfig`, for PPO) and ``sizes``; returns
    ``{"seconds": {stage: s}, "rm_eval_accuracy", "before": {...}, "after": {...}, "history": [...]}``
    where ``before`` / ``after`` are ``{"true_score", "exact", "rm_score", "completions"}`` on the held-out prompts."""
    from fastppo.tiny import tiny_qwen2, tiny_reward_model, tiny_tokenizer
    from fastppo.trainer import PPOTrainer
    from fastppo.trainer.reward_model import RewardModelConfig, reward_model_from_policy, train_reward_model
    from fastppo.trainer.sft import SFTConfig, sft

    sizes = sizes or DemoSizes()
    seed = config.run.seed
    tok = tiny_tokenizer()
    eval_prompts = task.make_prompts(sizes.eval_prompts, seed + 1, split="eval")
    seconds, report = {}, {}

    t = time.perf_counter()
    policy = tiny_qwen2(len(tok), seed=seed)
    res = sft(policy, tok, task.demonstrations(sizes.sft_examples, seed), config=SFTConfig(lr=sizes.sft_lr, seed=seed))
    seconds["sft"] = time.perf_counter() - t
    log(
        f"[1/4] SFT warm-up: {res.steps} steps on {sizes.sft_examples} demonstrations, "
        f"loss {res.losses[0]:.2f} -> {res.losses[-1]:.2f} nats/token ({seconds['sft']:.1f}s)"
    )

    t = time.perf_counter()
    rm = reward_model_from_policy(policy) if sizes.rm_from_policy else tiny_reward_model(len(tok), seed=seed + 1)
    rm_res = train_reward_model(
        rm,
        tok,
        task.preference_pairs(sizes.rm_pairs, seed + 2),
        config=RewardModelConfig(lr=sizes.rm_lr, seed=seed),
        eval_pairs=task.preference_pairs(sizes.rm_eval_pairs, seed + 3, split="eval"),
    )
    seconds["reward_model"] = time.perf_counter() - t
    report["rm_eval_accuracy"] = rm_res.eval_accuracy
    log(
        f"[2/4] reward model: {rm_res.steps} Bradley-Terry steps on {sizes.rm_pairs} preference pairs, "
        f"pair accuracy train {rm_res.train_accuracy:.3f}, held-out {rm_res.eval_accuracy:.3f} "
        f"({seconds['reward_model']:.1f}s)"
    )

    t = time.perf_counter()
    report["before"] = _evaluate(policy, tok, rm, eval_prompts, seed)
    trainer = PPOTrainer(
        config,
        policy,
        tok,
        rm,
        train_prompts=task.make_prompts(sizes.train_prompts, seed),
        eval_prompts=eval_prompts,
    )
    log(f"[3/4] PPO against the reward model, KL leash to the warm-up policy: {config.run.max_steps} steps")
    report["history"] = trainer.train()
    seconds["ppo"] = time.perf_counter() - t

    t = time.perf_counter()
    report["after"] = _evaluate(trainer.policy, tok, rm, eval_prompts, seed)
    seconds["eval"] = time.perf_counter() - t
    b, a = report["before"], report["after"]
    log(f"[4/4] held-out prompts ({len(eval_prompts)}, letter sets never trained on), sampled at temperature 1:")
    log(f"      {'':14} {'true score':>10} {'exact':>7} {'RM score':>9}")
    for name, r in (("after SFT", b), ("after PPO", a)):
        log(f"      {name:14} {r['true_score']:10.3f} {r['exact']:7.1%} {r['rm_score']:9.3f}")
    for p, cb, ca in list(zip(eval_prompts, b["completions"], a["completions"]))[: sizes.samples_shown]:
        log(f"      {p!r}: {cb!r} -> {ca!r}   (answer {task.answer(p)!r})")
    report["seconds"] = seconds
    plot = _plot(config.run.output_dir)
    log(
        "stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        + f"; files in {config.run.output_dir}/"
        + (f", plot {plot}" if plot else "")
    )
    return report


def _plot(output_dir):
    """``output_dir/plot.png`` when the plotter and matplotlib are available, else None (silently)."""
    try:
        import matplotlib  # noqa: F401

        from fastppo.trainer.plot import plot_run
    except ImportError:
        return None
    return plot_run(output_dir, pathlib.Path(output_dir) / "plot.png")


@contextlib.contextmanager
def _one_cpu_thread(device: str):
    """One intra-op thread on a CPU run: the tiny models' matmuls are too small to gain from threads,
    and two threads on a shared 2-core machine oversubscribe it (measured 3x slower)."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_preset(config) -> int:
    """``fastppo train`` without ``--model``: the demo; ``config`` (``PRESET`` under the flags) is its PPO stage's."""
    print(
        f"fastppo train: no --model given, running the built-in demo (RLHF in miniature) into {config.run.output_dir}/"
    )
    pipeline(config)
    return 0


@dataclasses.dataclass
class DemoConfig(DemoSizes):
    """``python -m fastppo.demo``: the stages' sizes and the most useful PPO knobs."""

    iterations: int = PRESET["max_steps"]
    """PPO steps (rollout + update): PPOConfig.max_steps."""
    batch_size: int = PRESET["rollout_batch_size"]
    """Prompts per PPO rollout."""
    kl_coef: float = PRESET["kl_coef"]
    """Weight of the per-token KL penalty to the warm-up policy."""
    seed: int = 0
    """Seeds every stage."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    output_dir: str | None = None
    """Where the run's files go (None: a temporary folder, deleted at the end)."""

    def ppo_config(self, output_dir: str):
        from fastppo.trainer.config import PPOConfig

        return PPOConfig.from_dict(
            dict(
                PRESET,
                max_steps=self.iterations,
                rollout_batch_size=self.batch_size,
                kl_coef=self.kl_coef,
                seed=self.seed,
                device=self.device,
                output_dir=output_dir,
                progress_bar=False,
            )
        ).validate()

    def sizes(self) -> DemoSizes:
        return DemoSizes(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DemoSizes)})


def run(cfg: DemoConfig, *, log=print) -> dict:
    """The demo with ``cfg``; returns :func:`pipeline`'s report."""
    folder = tempfile.TemporaryDirectory() if cfg.output_dir is None else contextlib.nullcontext(cfg.output_dir)
    with folder as out, _one_cpu_thread(cfg.device):
        return pipeline(cfg.ppo_config(out), cfg.sizes(), log=log)


def main(argv=None) -> int:
    from transformers import HfArgumentParser

    from fastppo.trainer.config import field_docs

    parser = HfArgumentParser(DemoConfig, prog="python -m fastppo.demo", description=__doc__.splitlines()[0])
    docs = {**field_docs(DemoSizes), **field_docs(DemoConfig)}
    for action in parser._actions:
        if action.dest in docs:
            action.help = docs[action.dest]
    (cfg,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
