"""train_reward_model / score_texts / bradley_terry_loss: the loss, learning, pooling, errors."""

import math

import pytest
import torch

from fastppo.tiny import tiny_qwen2, tiny_reward_model, tiny_tokenizer
from fastppo.trainer import demo_task as dt
from fastppo.trainer.reward_model import (
    RewardModelConfig,
    bradley_terry_loss,
    pair_accuracy,
    reward_model_from_policy,
    score_texts,
    train_reward_model,
)
from tests._trainer_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bradley_terry_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -2, 0
    nll = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2)) + math.log(2)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(nll, rel=1e-6)
    center = (1 + 4 + 36) / 3  # mean((chosen + rejected)^2)
    got = bradley_terry_loss(chosen, rejected, center_coef=0.1).item()
    assert got == pytest.approx(nll + 0.1 * center, rel=1e-6)


def test_pair_accuracy_rises_above_chance_after_a_few_steps():
    tok = tiny_tokenizer()
    rm = tiny_reward_model(len(tok), seed=0)
    held_out = dt.preference_pairs(200, seed=2, split="eval")
    before, _ = pair_accuracy(rm, tok, held_out)
    cfg = RewardModelConfig(batch_size=32, lr=1e-3, seed=0)
    result = train_reward_model(rm, tok, dt.preference_pairs(1920, seed=1), config=cfg, eval_pairs=held_out)
    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert result.eval_accuracy > 0.65 and result.eval_accuracy > before + 0.1, (before, result.eval_accuracy)
    assert result.eval_accuracy == pytest.approx(pair_accuracy(rm, tok, held_out)[0])


def test_training_is_deterministic_under_a_seed():
    tok = tiny_tokenizer()
    pairs = dt.preference_pairs(64, seed=1)
    runs = [
        train_reward_model(tiny_reward_model(len(tok)), tok, pairs, config=RewardModelConfig(batch_size=16))
        for _ in "ab"
    ]
    assert runs[0].losses == runs[1].losses


def test_score_does_not_depend_on_padding_side_or_batch():
    rm = tiny_reward_model(len(tiny_tokenizer()), seed=3)
    prompts = ["sort dbca: ", "sort ab: ", "sort jihgfe: "]
    completions = ["abcd", "", "efghijxyz"]
    left = score_texts(rm, tiny_tokenizer("left"), prompts, completions)
    right = score_texts(rm, tiny_tokenizer("right"), prompts, completions)
    alone = torch.cat([score_texts(rm, tiny_tokenizer("right"), [p], [c]) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(left, right)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert left.dtype == torch.float32 and left.shape == (3,)


def test_reward_model_from_policy_starts_at_zero_and_keeps_the_policy():
    tok = tiny_tokenizer()
    policy = tiny_qwen2(len(tok), seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    rm = reward_model_from_policy(policy)
    assert score_texts(rm, tok, ["sort ab: "] * 2, ["ab", "ba"]).abs().max().item() == 0.0
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    torch.testing.assert_close(rm.model.embed_tokens.weight, policy.model.embed_tokens.weight)


def test_bad_input_names_the_argument():
    tok = tiny_tokenizer()
    rm = tiny_reward_model(len(tok))
    with pytest.raises(TypeError, match="model"):
        train_reward_model(tiny_qwen2(len(tok)), tok, [("a", "b", "c")])
    with pytest.raises(ValueError, match="pairs must not be empty"):
        train_reward_model(rm, tok, [])
    with pytest.raises(TypeError, match=r"pairs\[1\]\.rejected"):
        train_reward_model(rm, tok, [("a", "b", "c"), ("a", "b", 3)])
    with pytest.raises(ValueError, match=r"eval_pairs\[0\] lacks"):
        train_reward_model(rm, tok, [("a", "b", "c")], eval_pairs=[{"prompt": "a", "chosen": "b"}])
    with pytest.raises(TypeError, match="config"):
        train_reward_model(rm, tok, [("a", "b", "c")], config={"lr": 1})
    with pytest.raises(ValueError, match="lr"):
        RewardModelConfig(lr=0)
    with pytest.raises(ValueError, match="prompts and completions"):
        score_texts(rm, tok, ["a"], [])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        score_texts(rm, tok, ["a"], [None])
