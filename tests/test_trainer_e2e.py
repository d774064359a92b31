"""End to end: a few steps of PPO / GRPO / RLOO from save_pretrained folders, the run's files, the CLI."""

import math

import pytest
import torch

import fastppo
from fastppo.cli import main as fastppo_main
from fastppo.trainer import PPOConfig, PPOTrainer
from fastppo.trainer.metrics import NAMES
from tests._trainer_helpers import (
    EVAL_PROMPTS,
    PROMPTS,
    one_thread,  # noqa: F401 (a fixture)
    read_jsonl,
    save_policy,
    save_reward_model,
    small_config,
    untimed,
    vowels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"policy": str(save_policy(root / "policy")), "rm": str(save_reward_model(root / "rm"))}


@pytest.mark.parametrize(("advantage", "reward"), [("gae", "fn"), ("gae", "rm"), ("grpo", "rm"), ("rloo", "fn")])
def test_a_short_run_writes_every_output(tmp_path, folders, advantage, reward):
    cfg = small_config(tmp_path, advantage=advantage, save_final=advantage == "grpo")
    trainer = PPOTrainer(cfg, folders["policy"], None, vowels if reward == "fn" else folders["rm"],
                         train_prompts=PROMPTS, eval_prompts=EVAL_PROMPTS)  # fmt: skip
    if advantage == "gae" and reward == "rm":  # critic_init="auto": the reward model's body and head
        rm = trainer.reward.model
        assert torch.equal(trainer.critic.value_head.weight, rm.score.weight)
    history = trainer.train()
    out = tmp_path / "run"
    assert PPOConfig.from_yaml(out / "config.yaml") == cfg
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and len(history) == 2
    for m in metrics:
        assert set(NAMES) <= set(m), set(NAMES) - set(m)
        for name in set(NAMES) - {"explained_variance", "reward_length_corr"}:
            assert m[name] is not None and math.isfinite(m[name]), (name, m[name])
        assert m["rollout_logprob_diff"] < 1e-4  # Generator vs training recompute, fp32
        assert 0 < m["response_length_mean"] <= 5 and m["grad_norm"] > 0
        assert (m["value_loss"] > 0) == (advantage == "gae")
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2] and all(math.isfinite(e["eval_reward_mean"]) for e in evals)
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 * len(EVAL_PROMPTS) and set(samples[0]) == {"step", "prompt", "completion", "reward"}
    if cfg.run.save_final:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(out / "final")
        for (name, a), b in zip(trainer.policy.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_runs_are_reproducible(tmp_path, folders):
    runs = []
    for i in range(2):
        cfg = small_config(tmp_path / str(i), eval_every=0)
        trainer = PPOTrainer(cfg, folders["policy"], None, vowels, train_prompts=PROMPTS)
        runs.append([untimed(m) for m in trainer.train()])
    assert runs[0] == runs[1]


def test_the_command_line_trains_with_a_reward_file_and_columns(tmp_path, folders, capsys):
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions, ground_truth):\n"
        "    return {'match': [float(g in c) for c, g in zip(completions, ground_truth)],\n"
        "            'length': [-0.01 * len(c) for c in completions]}\n"
    )
    (tmp_path / "train.jsonl").write_text("\n".join(f'{{"prompt": "{p}", "ground_truth": "a"}}' for p in PROMPTS))
    (tmp_path / "eval.jsonl").write_text("\n".join(f'{{"prompt": "{p}", "ground_truth": "a"}}' for p in EVAL_PROMPTS))
    argv = ["train", "--model", folders["policy"], "--reward-fn", f"{tmp_path / 'reward.py'}:score"]
    argv += ["--prompts", str(tmp_path / "train.jsonl"), "--eval-prompts", str(tmp_path / "eval.jsonl")]
    argv += ["--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--rollout-batch-size", "4"]
    argv += ["--samples-per-prompt", "2", "--max-new-tokens", "4", "--advantage", "rloo", "--ignore-eos"]
    argv += ["--no-progress-bar", "--learning-rate", "1e-3", "--device", "cpu"]
    assert fastppo_main(argv) == 0
    metrics = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert {"reward/match", "reward/length"} <= set(metrics[-1])
    assert all(m["response_length_mean"] == 4 and m["truncated_rate"] == 1 for m in metrics)  # --ignore-eos
    assert "eval_reward/match" in read_jsonl(tmp_path / "out" / "eval.jsonl")[-1]
    assert (tmp_path / "out" / "final" / "config.json").exists()
    assert "step" in capsys.readouterr().out


def test_bad_lengths_are_rejected_before_the_weights_load(tmp_path, monkeypatch, capsys):
    import transformers

    folder = save_policy(tmp_path / "short", max_positions=16)

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    cfg = small_config(tmp_path, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"= 18 exceeds the model's max_position_embeddings=16"):
        PPOTrainer(cfg, str(folder), None, vowels, train_prompts=PROMPTS)
    with pytest.raises(ValueError, match="prompt 0 has 20 tokens, more than max_prompt_length=8"):
        PPOTrainer(small_config(tmp_path, max_prompt_length=8), str(folder), None, vowels,
                   train_prompts=["a much longer prompt"])  # fmt: skip
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    argv = ["train", "--model", str(folder), "--reward-fn", "math:sqrt", "--prompts", str(prompts)]
    capsys.readouterr()
    assert fastppo_main([*argv, "--max-new-tokens", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastppo train: error:") and "max_position_embeddings=16" in err[-1]


def test_fastppo_train_without_a_model_runs_the_builtin_preset(tmp_path, capsys):
    argv = ["train", "--max-steps", "2", "--eval-every", "0", "--output-dir", str(tmp_path / "demo")]
    argv += ["--rollout-batch-size", "8", "--max-new-tokens", "4", "--no-progress-bar", "--no-save-final"]
    assert fastppo_main(argv) == 0
    assert len(read_jsonl(tmp_path / "demo" / "metrics.jsonl")) == 2
    assert [e["step"] for e in read_jsonl(tmp_path / "demo" / "eval.jsonl")] == [0, 2]
    from fastppo.demo import PRESET

    cfg = PPOConfig.from_yaml(tmp_path / "demo" / "config.yaml")
    assert PRESET["rollout_batch_size"] != 8  # the flag below must be seen to win
    assert cfg.ppo.learning_rate == PRESET["learning_rate"] and cfg.rollout.rollout_batch_size == 8  # preset, flags
    out = capsys.readouterr().out  # the demo reports every stage, the held-out scores by truth and by RM
    assert all(f"[{i}/4]" in out for i in range(1, 5)) and "true score" in out and "RM score" in out


def test_a_ppo_step_from_the_public_building_blocks():
    """What a trainer author writes with fastppo's pieces: ~30 lines, no slicing or masks by hand."""
    from fastppo.tiny import EOS_ID, PAD_ID, tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    policy = tiny_qwen2(len(tok), seed=1)
    critic, ref = fastppo.ValueModel.from_policy(policy), fastppo.Reference(policy)
    head = fastppo.LogProbHead(policy)
    kl_ctl = fastppo.AdaptiveKLController(0.05, target=0.1, horizon=1000)
    opt = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=1e-4)
    gen = fastppo.Generator(policy, max_batch_size=8, max_length=24)

    prompts = tok(PROMPTS[:4] * 2, return_tensors="pt", padding=True)
    out = gen.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=8, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, generator=torch.Generator().manual_seed(0))  # fmt: skip
    mask = torch.cat([prompts.attention_mask.bool(), out.completion_mask], 1)
    seq, cmask, P = out.sequences, out.completion_mask, out.prompt_length
    scores = torch.tensor(vowels(None, tok.batch_decode(out.completions, skip_special_tokens=True)))
    with torch.no_grad():
        old_lp, _ = fastppo.completion_logprobs(head, out, prompts.attention_mask)
        ref_lp = ref.logprobs(seq, mask, P, completion_mask=cmask)
        values = critic(seq, mask, P)
    kl = fastppo.kl_penalty(old_lp, ref_lp, mask=cmask)
    rewards = fastppo.token_rewards(scores, cmask, kl, kl_ctl.value)
    adv, returns = fastppo.compute_advantages("gae", rewards, cmask, values=values)
    kl_ctl.update(float(fastppo.masked_mean(kl, cmask)), len(seq))
    lp, _ = head(seq, mask, P, completion_mask=cmask)
    pg_loss, stats = fastppo.policy_loss(lp, old_lp, adv, cmask)
    v_loss, _ = fastppo.value_loss(critic(seq, mask, P), values, returns, cmask, clip=0.2)
    opt.zero_grad()
    (pg_loss + 0.5 * v_loss).backward()
    opt.step()

    assert stats["clip_frac"] == 0 and stats["approx_kl"] < 1e-6  # old and new agree before the step
    assert ((out.logprobs - old_lp).abs() * cmask).max() < 1e-4
    assert torch.isfinite(pg_loss) and v_loss > 0 and kl_ctl.value != 0.05


def test_trainer_state_and_learner_states_are_what_a_resumed_run_needs(tmp_path, folders):
    """The seam checkpointing builds on: a run stopped after 2 steps and continued from its state_dict and
    its learner's states logs step 3 exactly as the uninterrupted run."""
    import copy

    def trainer(name):
        cfg = small_config(tmp_path / name, max_steps=3, eval_every=0, lr_scheduler="linear", adaptive_kl=True,
                           normalize_reward=True)  # fmt: skip
        return PPOTrainer(cfg, folders["policy"], None, vowels, train_prompts=PROMPTS)

    full = [untimed(m) for m in trainer("full").train()]

    first = trainer("first")
    first.callbacks.append(lambda t, m: setattr(t, "should_stop", m["step"] == 2))
    first.train()
    learner = first.learner
    saved = copy.deepcopy({
        "trainer": first.state_dict(),
        "modules": [learner.policy.state_dict(), learner.critic.state_dict()],
        "optimizers": [learner.policy_optimizer.state_dict(), learner.critic_optimizer.state_dict()],
        "schedulers": [learner.policy_scheduler.state_dict(), learner.critic_scheduler.state_dict()],
    })  # fmt: skip

    second = trainer("second")
    second.load_state_dict(saved["trainer"])
    learner = second.learner
    for obj, state in zip(
        [learner.policy, learner.critic, learner.policy_optimizer, learner.critic_optimizer,
         learner.policy_scheduler, learner.critic_scheduler],
        saved["modules"] + saved["optimizers"] + saved["schedulers"],
    ):  # fmt: skip
        obj.load_state_dict(state)
    resumed = [untimed(m) for m in second.train()]
    assert [m["step"] for m in resumed] == [3]
    assert resumed[0] == full[2]


def test_a_peft_policy_trains_its_adapters_with_itself_as_reference(tmp_path):
    peft = pytest.importorskip("peft")
    from fastppo.tiny import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    model = peft.get_peft_model(tiny_qwen2(len(tok), seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = PPOTrainer(small_config(tmp_path, advantage="grpo", save_final=True), model, tok, vowels,
                         train_prompts=PROMPTS)  # fmt: skip
    assert trainer.reference.model is model  # adapters disabled, no copy
    history = trainer.train()
    assert history[-1]["grad_norm"] > 0 and history[-1]["rollout_logprob_diff"] < 1e-4
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
