"""The PPO update: the gradient does not depend on the micro-batch size; non-finite values stop the run."""

import dataclasses
import math

import pytest
import torch

import fastppo
from fastppo.tiny import tiny_qwen2, tiny_tokenizer
from fastppo.trainer.metrics import Mean
from fastppo.trainer.update import NonFiniteError, ppo_update
from tests._trainer_helpers import (
    PROMPTS,
    one_thread,  # noqa: F401 (a fixture)
    small_config,
    vowels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, **fields):
    tok = tiny_tokenizer()
    cfg = small_config(tmp_path, **fields)
    return fastppo.PPOTrainer(cfg, tiny_qwen2(len(tok), seed=2), tok, vowels, train_prompts=PROMPTS)


def _experience(trainer):
    roll = trainer._rollout(trainer.sampler.next(), trainer.sample_rng, do_sample=True, samples=2)
    return trainer._prepare(roll, trainer._score(roll)[0])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, agg):
    # one mini-batch: after ppo_update the .grad fields hold that mini-batch's accumulated gradient
    trainer = _trainer(tmp_path, num_minibatches=1, max_grad_norm=None, loss_agg=agg, ent_coef=0.01, kl_mode="loss")
    exp, _ = _experience(trainer)
    exp = exp.without_live()  # updated three times from the same weights: every forward recomputed
    lengths = exp.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1  # ragged rows: a per-micro-batch mean would differ
    grads = {}
    start = [{k: v.clone() for k, v in m.state_dict().items()} for m in (trainer.policy, trainer.critic)]
    for micro in (8, 4, 1):
        for m, state in zip((trainer.policy, trainer.critic), start):
            m.load_state_dict(state)
        cfg = dataclasses.replace(trainer.config, ppo=dataclasses.replace(trainer.config.ppo, micro_batch_size=micro))
        ppo_update(exp, trainer.learner, cfg, rng=torch.Generator().manual_seed(0), meter=Mean(), kl_coef=0.05)
        grads[micro] = [p.grad.clone() for p in [*trainer.policy.parameters(), *trainer.critic.parameters()]]
    for micro in (4, 1):
        for a, b in zip(grads[8], grads[micro]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-12)


def test_a_non_finite_loss_stops_before_any_weight_changes(tmp_path):
    trainer = _trainer(tmp_path, num_minibatches=1)
    exp, _ = _experience(trainer)
    exp.advantages[0, 0] = float("nan")
    before = [p.detach().clone() for p in [*trainer.policy.parameters(), *trainer.critic.parameters()]]
    with pytest.raises(NonFiniteError, match=r"step 3, epoch 1, mini-batch 1: policy_loss is nan"):
        ppo_update(exp, trainer.learner, trainer.config, rng=torch.Generator(), meter=Mean(), step=2)
    after = [*trainer.policy.parameters(), *trainer.critic.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_non_finite_reward_stops_the_run_naming_the_sample(tmp_path):
    from fastppo.trainer.rewards import RewardError

    tok = tiny_tokenizer()
    cfg = small_config(tmp_path, eval_every=0)
    bad = lambda prompts, completions: [float("inf")] * len(completions)  # noqa: E731
    trainer = fastppo.PPOTrainer(cfg, tiny_qwen2(len(tok)), tok, bad, train_prompts=PROMPTS)
    with pytest.raises(RewardError, match=r"returned scores = inf for sample 0: prompt="):
        trainer.train()


def test_critic_warmup_freezes_the_policy(tmp_path):
    trainer = _trainer(tmp_path, critic_warmup_steps=1, eval_every=0)
    policy_before = [p.detach().clone() for p in trainer.policy.parameters()]
    critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
    m = trainer.step()
    assert m["grad_norm"] == 0 and m["policy_loss"] == 0 and m["critic_grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(policy_before, trainer.policy.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.parameters()))
    assert trainer.step()["grad_norm"] > 0  # warm-up over


def test_target_kl_stops_the_remaining_epochs(tmp_path):
    counts = {}
    for target in (None, 1e-12):
        trainer = _trainer(tmp_path, ppo_epochs=3, num_minibatches=2, target_kl=target, eval_every=0)
        trainer.step()
        counts[target] = trainer.learner.policy_scheduler.last_epoch  # optimizer steps taken
    assert counts[None] == 6 and counts[1e-12] < 6


def test_optimizer_is_fused_on_cpu_and_steps_as_the_default_adamw():
    from types import SimpleNamespace

    from fastppo.trainer.update import make_optimizer

    ppo = SimpleNamespace(adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        if fused:
            opt = make_optimizer([*params, frozen], 1e-2, ppo)
            assert opt.defaults["fused"] is True
        else:  # the reference: torch's default (for-each / single-tensor) implementation
            opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        assert len(opt.param_groups[0]["params"]) == 2  # the frozen one is left out
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_reuse_rollout_logprobs_takes_the_generators_and_skips_the_old_policy_forward(tmp_path):
    runs = {}
    for reuse in (False, True):
        trainer = _trainer(tmp_path / str(reuse), reuse_rollout_logprobs=reuse, eval_every=0)
        calls = []
        trainer.head.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        runs[reuse] = (trainer.step(), len(calls))
    (base, base_calls), (reused, reused_calls) = runs[False], runs[True]
    assert reused_calls == base_calls - 1  # the old-policy pass (one micro-batch); the update's stay
    assert reused["rollout_logprob_diff"] == 0 and 0 < base["rollout_logprob_diff"] < 1e-5
    assert math.isnan(reused["entropy"]) and math.isfinite(base["entropy"])
    for name in ("reward_mean", "kl", "policy_loss", "value_loss", "approx_kl", "grad_norm"):
        assert reused[name] == pytest.approx(base[name], rel=1e-4, abs=1e-6), name


def test_keep_first_forward_saves_a_forward_of_each_model_and_changes_nothing(tmp_path):
    """One mini-batch, one micro-batch: prepare's policy and critic forwards, kept with their graphs, are
    the update's; the step's metrics and new weights are those of recomputing them, one forward fewer each."""
    runs = {}
    for keep in (False, True):
        trainer = _trainer(
            tmp_path / str(keep), num_minibatches=1, keep_first_forward=keep, ent_coef=0.01, eval_every=0
        )
        assert trainer.keep_first_forward is keep
        calls = {"policy": 0, "critic": 0}
        for name, module in (("policy", trainer.head), ("critic", trainer.critic)):
            module.register_forward_pre_hook(
                lambda *a, name=name, calls=calls: calls.__setitem__(name, calls[name] + 1)
            )
        metrics = trainer.step()
        runs[keep] = (
            metrics,
            calls,
            [p.detach().clone() for p in [*trainer.policy.parameters(), *trainer.critic.parameters()]],
        )
    (base, base_calls, base_w), (kept, kept_calls, kept_w) = runs[False], runs[True]
    assert kept_calls == {"policy": base_calls["policy"] - 1, "critic": base_calls["critic"] - 1}
    assert kept["approx_kl"] == 0 and kept["clip_frac"] == 0 and kept["ratio_max"] == 1  # exactly on-policy
    for name in ("reward_mean", "kl", "entropy", "policy_loss", "value_loss", "grad_norm", "critic_grad_norm"):
        assert kept[name] == pytest.approx(base[name], rel=1e-5, abs=1e-7), name
    moved = max(float((a - b).abs().max()) for a, b in zip(base_w, kept_w))
    assert moved < 1e-6


def test_kept_forwards_refuse_micro_batches(tmp_path):
    trainer = _trainer(tmp_path, num_minibatches=1)
    exp, _ = _experience(trainer)
    assert exp.live
    cfg = dataclasses.replace(trainer.config, ppo=dataclasses.replace(trainer.config.ppo, micro_batch_size=2))
    with pytest.raises(ValueError, match="kept forwards"):
        ppo_update(exp, trainer.learner, cfg, rng=torch.Generator(), meter=Mean())
    for fields in (
        dict(num_minibatches=2),
        dict(num_minibatches=1, micro_batch_size=4),
        dict(keep_first_forward=False),
    ):
        assert not _trainer(tmp_path, **fields).keep_first_forward


def test_widths_are_selects_trim_for_every_micro_batch():
    from fastppo.trainer.experience import Experience

    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    B, N, P = mask.shape[0], mask.shape[1], 3
    z = torch.zeros(B, N)
    exp = Experience(torch.zeros(B, P + N, dtype=torch.long), torch.ones(B, P + N, dtype=torch.bool), mask, P, z, z)
    parts = [torch.tensor([0]), torch.tensor([2]), torch.tensor([1, 2]), torch.tensor([3, 0]), torch.arange(B)]
    assert exp.widths(parts) == [2, 1, 3, 4, 4]
    for rows, width in zip(parts, exp.widths(parts)):
        part = exp.select(rows, width)
        assert part.completion_mask.shape == (len(rows), width) and part.sequences.shape == (len(rows), P + width)
        assert torch.equal(exp.select(rows).completion_mask, part.completion_mask)


def test_reward_model_scores_are_normal_tensors_as_under_no_grad():
    from fastppo.tiny import tiny_reward_model
    from fastppo.trainer.rewards import RewardModel

    tok = tiny_tokenizer()
    rm = RewardModel(tiny_reward_model(len(tok), seed=1), tok, same_tokenizer=True)
    texts = ["aeiou", "xyz", "ab"]
    scores = rm(texts)  # under inference mode inside, returned as a normal tensor
    assert not scores.is_inference() and scores.shape == (3,)
    with torch.no_grad():
        ref = torch.cat([rm._score([ids], torch.device("cpu")) for ids in tok(texts)["input_ids"]])
    torch.testing.assert_close(scores, ref, atol=1e-6, rtol=1e-6)
    scores.add_(1.0)  # in-place use outside inference mode works
