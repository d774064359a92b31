"""Building blocks of a step: prompts, rewards and shaping, token rewards, KL controllers, advantages, metrics."""

import json
import math

import pytest
import torch

import fastppo
from fastppo.tiny import tiny_reward_model, tiny_tokenizer
from fastppo.trainer.data import PromptSampler, read_prompts, tokenize_prompts
from fastppo.trainer.experience import Experience, last_token_mask
from fastppo.trainer.metrics import METRICS, NAMES, Mean, markdown_table
from fastppo.trainer.rewards import RewardError, RewardFunction, RewardModel, RewardShaper, load_reward_function
from tests._trainer_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- data
def test_read_prompts_jsonl_txt_and_lists(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "a", "ground_truth": 1}) + "\n\n" + json.dumps({"prompt": "b", "extra": "x"}) + "\n"
    )
    prompts, columns = read_prompts(tmp_path / "p.jsonl")
    assert prompts == ["a", "b"] and columns == {"ground_truth": [1, None], "extra": [None, "x"]}
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(str(tmp_path / "p.txt")) == (["one", "two"], {})
    assert read_prompts([{"q": "z", "k": 2}], column="q") == (["z"], {"k": [2]})
    with pytest.raises(ValueError, match="record 0 has no string field 'prompt'"):
        read_prompts([{"text": "a"}])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")


def test_long_prompts_are_an_error_or_cut_from_the_left():
    tok = tiny_tokenizer()
    with pytest.raises(
        ValueError, match=r"prompt 1 has 6 tokens, more than max_prompt_length=4 \(set truncate_prompts"
    ):
        tokenize_prompts(["ab", "abcdef"], {}, tok, max_length=4)
    data = tokenize_prompts(["ab", "abcdef"], {}, tok, max_length=4, truncate=True)
    assert data.ids[1] == tok("cdef")["input_ids"] and data.max_length == 4


def test_sampler_visits_every_prompt_each_epoch_and_resumes_from_its_state():
    s = PromptSampler(5, 3, seed=1)
    first = [s.next() for _ in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    t = PromptSampler(5, 3, seed=1)
    for _ in range(2):
        t.next()
    u = PromptSampler(5, 3, seed=1)
    u.load_state_dict(t.state_dict())
    assert [u.next() for _ in range(3)] == first[2:]


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_function_scores_components_and_columns():
    def fn(prompts, completions, ground_truth):
        return {"match": [float(c == g) for c, g in zip(completions, ground_truth)], "len": [0.1] * len(prompts)}

    scores, parts = RewardFunction(fn)(["p", "q"], ["a", "b"], {"ground_truth": ["a", "x"]})
    torch.testing.assert_close(scores, torch.tensor([1.1, 0.1]))
    assert set(parts) == {"match", "len"}


def test_reward_function_errors_name_the_sample():
    def picky(prompts, completions, **kw):
        if "bad" in completions:
            raise KeyError("no")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"raised KeyError.*sample 1: prompt='q' completion='bad'"):
        RewardFunction(picky)(["p", "q"], ["ok", "bad"], {})
    with pytest.raises(RewardError, match=r"shape \(1,\) for 2 completions"):
        RewardFunction(lambda p, c: [1.0])(["p", "q"], ["a", "b"], {})
    with pytest.raises(RewardError, match=r"nan for sample 1: prompt='q'"):
        RewardFunction(lambda p, c: [0.0, math.nan])(["p", "q"], ["a", "b"], {})


def test_load_reward_function_from_module_or_file(tmp_path):
    assert load_reward_function("math:sqrt") is math.sqrt
    (tmp_path / "r.py").write_text("def score(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    assert load_reward_function(f"{tmp_path / 'r.py'}:score")([], ["abc"]) == [3]
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_function("math:nope")


def test_reward_model_with_its_own_tokenizer_retokenizes_the_texts():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    policy_tok = tiny_tokenizer()
    vocab = {t: i for i, t in enumerate(reversed(list(policy_tok.get_vocab())))}  # other ids for the same text
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(__import__("tokenizers").Regex("."), behavior="isolated")
    own = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    rm = tiny_reward_model(len(vocab), seed=2)
    texts = ["Hello there", "ab"]
    policy_ids = policy_tok(texts)["input_ids"]
    scored = RewardModel(rm, own, same_tokenizer=False)(texts, policy_ids)
    alone = torch.stack([RewardModel(rm, own)([t])[0] for t in texts])  # one at a time: no padding at all
    torch.testing.assert_close(scored, alone, rtol=1e-5, atol=1e-5)
    naive = torch.stack([rm(**own(t, return_tensors="pt")).logits[0, 0] for t in texts]).detach()
    torch.testing.assert_close(scored, naive, rtol=1e-5, atol=1e-5)
    wrong = RewardModel(rm, own, same_tokenizer=True)(texts, policy_ids)  # reading policy ids is not the same
    assert not torch.allclose(wrong, scored)


def test_reward_shaper_penalty_normalization_clip_and_state():
    s = RewardShaper(missing_eos_penalty=1.0, clip=0.5)
    out = s(torch.tensor([0.2, 0.2, 3.0]), torch.tensor([True, False, True]))
    torch.testing.assert_close(out, torch.tensor([0.2, -0.5, 0.5]))
    n = RewardShaper(normalize=True)
    x = torch.randn(64) * 3 + 2
    y = n(x, torch.ones(64, dtype=torch.bool))
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-3
    m = RewardShaper(normalize=True)
    m.load_state_dict(n.state_dict())
    torch.testing.assert_close(m(x[:4], torch.ones(4, dtype=torch.bool)), n(x[:4], torch.ones(4, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------- experience
def test_token_rewards_put_the_score_on_the_last_valid_token_and_subtract_kl():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_mask(mask).nonzero().tolist() == [[0, 2], [1, 0], [2, 3]]
    kl = torch.full((3, 4), 2.0)
    r = fastppo.token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask, kl, kl_coef=0.1)
    expected = torch.tensor([[-0.2, -0.2, 0.8, 0], [1.8, 0, 0, 0], [-0.2, -0.2, -0.2, 2.8]])
    torch.testing.assert_close(r, expected)


def test_kl_controllers_fixed_and_adaptive():
    fixed = fastppo.FixedKLController(0.1)
    fixed.update(5.0, 100)
    assert fixed.value == 0.1
    ada = fastppo.AdaptiveKLController(0.1, target=0.5, horizon=1000)
    ada.update(5.0, 100)  # far above target: error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ada.update(0.25, 100)  # half the target: error -0.5, clipped to -0.2
    assert ada.value == pytest.approx(0.1 * 1.02 * 0.98)
    other = fastppo.AdaptiveKLController(0.3, target=0.5, horizon=1000)
    other.load_state_dict(ada.state_dict())
    assert other.value == ada.value


def test_compute_advantages_gae_and_group_methods():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    rewards = fastppo.token_rewards(torch.tensor([1.0, 0.0, 2.0, 4.0]), mask)
    values = torch.randn(4, 3)
    adv, ret = fastppo.compute_advantages("gae", rewards, mask, values=values, lam=0.9, whiten=False)
    ref_adv, ref_ret = fastppo.gae(rewards, values, mask, gamma=1.0, lam=0.9)
    assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)
    adv, ret = fastppo.compute_advantages("rloo", rewards, mask, group_size=2, whiten=False)
    assert ret is None
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, -1.0, -2.0, 2.0]))
    assert torch.all(adv[~mask] == 0) and torch.all(adv[1] == -1)
    adv, _ = fastppo.compute_advantages("grpo", rewards, mask, group_size=2, whiten=True)
    assert abs(fastppo.masked_mean(adv, mask)) < 1e-5
    with pytest.raises(ValueError, match="needs the critic's values"):
        fastppo.compute_advantages("gae", rewards, mask)


def test_experience_select_trims_to_the_longest_completion():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    exp = Experience(torch.zeros(3, 6, dtype=torch.long), torch.ones(3, 6, dtype=torch.bool), mask, 2,
                     torch.zeros(3, 4), torch.zeros(3, 4))  # fmt: skip
    part = exp.select(torch.tensor([1, 0]))
    assert part.completion_mask.shape == (2, 2) and part.sequences.shape == (2, 4) and part.values is None


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_are_defined_once_with_docs():
    assert len(NAMES) == len(set(NAMES))
    assert all(m.formula for m in METRICS)
    table = markdown_table()
    assert all(f"`{n}`" in table for n in NAMES)


def test_mean_is_weighted_and_reads_the_device_once():
    m = Mean()
    m.add("loss", torch.tensor(1.0), 3)
    m.add("loss", torch.tensor(3.0), 1)
    m.add_sum("tok", torch.tensor(10.0), 4)
    m.max("top", 2.0)
    m.max("top", torch.tensor(1.0))
    assert m.result() == {"loss": 1.5, "tok": 2.5, "top": 2.0}
