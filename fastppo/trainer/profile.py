"""``fastppo profile``: a few trainer steps under ``torch.profiler``, and where their time went.

    fastppo profile [--config FILE.yaml] [--FIELD VALUE ...]      # the options of fastppo train
    fastppo profile --max-steps 6 --output-dir prof              # 1 warm-up step + 5 profiled ones

Runs ``--max-steps`` trainer steps (default :data:`DEFAULT_STEPS`, whatever a config file says): the
first unprofiled (it pays CUDA-graph capture, compilation and lazy initialisation), the others under
``torch.profiler`` (CPU activities, and CUDA ones on a GPU, with memory), each phase in its
``record_function`` range (:mod:`fastppo.trainer.phases`) and each fastppo op in its ``fastppo.<op>``
range. Then it measures the matmul peak of the device and writes into ``--output-dir`` (default
``fastppo_profile``):

* ``trace.json``: the Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing);
* ``summary.json`` and ``summary.md``: :mod:`fastppo.trainer.profile_summary` (time per phase and
  its share of the step, tokens/s, peak memory per phase, the top kernels with fastppo's marked,
  host syncs per decode step, model FLOP utilization against the measured matmul peak).

Without ``--model``: the built-in demo's PPO stage (its preset, its task's prompts) on its tiny
policy and reward model as initialised, without the SFT and reward-model stages (they change the
weights, not what a step computes), on one CPU thread as the demo runs. Only steps run: no
evaluation, checkpoint or saved model. Options are checked as ``fastppo train`` checks them, before
any model loads; an error is one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import torch

from fastppo.trainer.cli import model_given, parse_config

PROG = "fastppo profile"
DEFAULT_STEPS = 4
OUTPUT_DIR = "fastppo_profile"


def _error(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return 2


def _steps_flag(argv) -> int | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--max-steps", "--max_steps", dest="max_steps", default=None)
    known, _ = pre.parse_known_args(argv)
    return None if known.max_steps is None else int(known.max_steps)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fastppo.trainer.distributed import torchrun_env

    if torchrun_env():  # every rank would write the same files; the phases are per process anyway
        return _error("fastppo profile runs in one process, not under torchrun")
    base = {"output_dir": OUTPUT_DIR, "progress_bar": False}
    demo = not model_given(argv)
    if demo:
        from fastppo.demo import PRESET

        base = {**PRESET, **base}
    config = parse_config(argv, base=base, prog=PROG)  # exits 2 with one line on a bad option
    steps = _steps_flag(argv)
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 2:
        return _error(f"--max-steps {steps}: at least 2 (the first step is a warm-up, not profiled)")
    if demo:
        from fastppo.demo import _one_cpu_thread

        with _one_cpu_thread(config.model.device):
            trainer = _demo_trainer(config)
            summary = profile(trainer, steps, config.run.output_dir, what=_demo_what(config))
    else:
        from fastppo.trainer.trainer import PPOTrainer

        try:
            trainer = PPOTrainer.from_config(config)
        except (ValueError, TypeError) as e:
            return _error(str(e))
        summary = profile(trainer, steps, config.run.output_dir, what=f"model {config.model.model}")
    from fastppo.trainer.profile_summary import markdown

    print(markdown(summary))
    out = pathlib.Path(config.run.output_dir)
    print(
        f"files: {out / 'trace.json'} (open in https://ui.perfetto.dev), {out / 'summary.json'}, {out / 'summary.md'}"
    )
    return 0


def _demo_trainer(config):
    from fastppo.demo import DemoSizes
    from fastppo.tiny import tiny_qwen2, tiny_reward_model, tiny_tokenizer
    from fastppo.trainer import demo_task as task
    from fastppo.trainer.trainer import PPOTrainer

    seed = config.run.seed
    tok = tiny_tokenizer()
    policy, rm = tiny_qwen2(len(tok), seed=seed), tiny_reward_model(len(tok), seed=seed + 1)
    prompts = task.make_prompts(DemoSizes().train_prompts, seed)
    return PPOTrainer(config, policy, tok, rm, train_prompts=prompts)


def _demo_what(config) -> str:
    r = config.rollout
    return (
        f"the demo's PPO stage (tiny Qwen2 policy and reward model as initialised, no SFT / reward-model stage): "
        f"{config.batch_size} completions of <= {r.max_new_tokens} tokens per step, {config.ppo.ppo_epochs} PPO "
        f"epochs x {config.ppo.num_minibatches} mini-batches, advantage {config.ppo.advantage}"
    )


class _GenerationCount:
    """Wraps ``generator.generate`` (on the instance) to count prompt tokens, sampled tokens and decode steps."""

    def __init__(self, generator):
        self.generator, self.original = generator, generator.generate
        self.shadowed = vars(generator).get("generate")  # an instance attribute there before ours, if any
        self.masks, self.generated, self.decode_steps = [], 0, 0

        def generate(input_ids, attention_mask, **kwargs):
            out = self.original(input_ids, attention_mask, **kwargs)
            self.masks.append(attention_mask)  # summed after profiling: a read here would be a host sync in gen
            self.generated += out.num_tokens
            self.decode_steps += out.decode_steps
            return out

        generator.generate = generate

    def reset(self):
        self.masks, self.generated, self.decode_steps = [], 0, 0

    def prompt_tokens(self) -> int:
        return sum(int(m.sum()) for m in self.masks)

    def close(self):
        if self.shadowed is not None:
            self.generator.generate = self.shadowed
        else:
            del self.generator.generate  # back to the class's method


def matmul_params(model) -> int:
    """Parameters of ``model`` outside its input embeddings (a tied lm_head still counts): the ``N`` of
    ``2 N`` FLOPs per token."""
    if model is None:
        return 0
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    return sum(p.numel() for p in model.parameters() if id(p) not in embed)


def model_flops(trainer, tokens: int, trained_steps: int, steps: int) -> dict:
    """Model FLOPs per phase (:data:`fastppo.trainer.profile_summary.FLOPS_FORMULA`) of ``steps`` steps
    over ``tokens`` rollout tokens in all, the policy trained in ``trained_steps`` of them."""
    from fastppo.trainer.rewards import RewardModel

    policy, epochs = matmul_params(trainer.policy), trainer.config.ppo.ppo_epochs
    reuse = trainer.config.rollout.reuse_rollout_logprobs
    # keep_first_forward: the first update's forwards ran in prepare (old_log_prob, values), counted there
    kept = trainer.keep_first_forward
    flops = {"gen": 2 * policy * tokens}
    if not reuse:
        flops["old_log_prob"] = 2 * policy * tokens
    if isinstance(trainer.reward, RewardModel):
        flops["reward"] = 2 * matmul_params(trainer.reward.model) * tokens
    if trainer.reference is not None:
        flops["ref"] = 2 * matmul_params(trainer.reference.model) * tokens
    if trainer.critic is not None:
        critic = matmul_params(trainer.critic)
        flops["values"] = 2 * critic * tokens
        flops["update_critic"] = (6 * epochs - 2 * kept) * critic * tokens
    if trained_steps:
        flops["update_actor"] = (6 * epochs - 2 * (kept and not reuse)) * policy * tokens * trained_steps / steps
    return flops


def _not_run(trainer, trained_steps: int) -> dict:
    c = trainer.config
    why = {}
    if c.rollout.reuse_rollout_logprobs:
        why["old_log_prob"] = "reuse_rollout_logprobs=True: the Generator's log-probs are the old policy's"
    if trainer.critic is None:
        why["values"] = why["update_critic"] = f"no critic with advantage={c.ppo.advantage!r} (gae has one)"
    if trainer.reference is None:
        why["ref"] = "no reference model (kl_coef=0)"
    if not trained_steps:
        why["update_actor"] = (
            f"the policy is frozen in the critic warm-up (critic_warmup_steps={c.critic.critic_warmup_steps})"
        )
    return why


def _fastppo_backward() -> frozenset:
    """Backward node names of the autograd functions fastppo defines (those imported so far)."""
    seen, todo = set(), list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo += cls.__subclasses__()
    return frozenset(f"{c.__name__}Backward" for c in seen if c.__module__.startswith("fastppo"))


def _peak(trainer) -> tuple[str, float, dict]:
    from fastppo.bench.peaks import MATMUL_PEAK, measure_peaks
    from fastppo.bench.timing import CUDA_TIMER, QUICK_CPU_TIMER

    device = trainer.device.type
    peaks = measure_peaks(device, CUDA_TIMER if device == "cuda" else QUICK_CPU_TIMER, quick=True)
    autocast = trainer._autocast() is not contextlib.nullcontext  # bf16 autocast of the forwards
    dtype = "bfloat16" if autocast else str(next(trainer.policy.parameters()).dtype).removeprefix("torch.")
    name = MATMUL_PEAK.get(dtype, "matmul_fp32_tflops")
    return name, peaks[name], peaks


def profile(trainer, steps: int, output_dir, *, what: str = "") -> dict:
    """Run ``steps`` trainer steps, profile all but the first, write ``trace.json``, ``summary.json`` and
    ``summary.md`` into ``output_dir``; returns the summary."""
    import fastppo
    from fastppo.trainer.profile_summary import RunFacts, markdown, summarize

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = trainer.device.type == "cuda"
    warmup = trainer.config.critic.critic_warmup_steps
    count = _GenerationCount(trainer.generator)
    try:
        trainer.step()  # warm-up: graph capture, compilation, lazy inits
        count.reset()
        trained = 0
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            for _ in range(steps - 1):
                trained += trainer.step_count >= warmup
                trainer.step()
            if cuda:
                torch.cuda.synchronize(trainer.device)
        prof.export_chrome_trace(str(out / "trace.json"))
    finally:
        count.close()
    peak_name, peak, peaks = _peak(trainer)
    prompt_tokens = count.prompt_tokens()
    tokens = prompt_tokens + count.generated
    setup = {
        "what": what,
        "fastppo": fastppo.__version__,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(trainer.device) if cuda else "CPU",
        "warmup_steps": 1,
        "peaks": peaks,
    }
    if not cuda:
        setup["threads"] = torch.get_num_threads()
    facts = RunFacts(
        device="cuda" if cuda else "cpu",
        steps=steps - 1,
        generated_tokens=count.generated,
        prompt_tokens=prompt_tokens,
        decode_steps=count.decode_steps,
        flops=model_flops(trainer, tokens, trained, steps - 1),
        peak_tflops=peak,
        peak_name=peak_name,
        not_run=_not_run(trainer, trained),
        fastppo_backward=_fastppo_backward(),
        setup=setup,
    )
    with open(out / "trace.json") as f:
        summary = summarize(json.load(f), facts)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
