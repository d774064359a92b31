"""sft(): the loss falls, only completion tokens (and EOS) are learned, errors name the argument."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastppo.tiny import EOS_ID, tiny_qwen2, tiny_reward_model, tiny_tokenizer
from fastppo.trainer import demo_task as dt
from fastppo.trainer.sft import SFTConfig, sft
from tests._trainer_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_decreases():
    tok = tiny_tokenizer()
    model = tiny_qwen2(len(tok), seed=0)
    result = sft(model, tok, dt.demonstrations(192, seed=0), config=SFTConfig(epochs=3, batch_size=32, lr=3e-3))
    assert result.steps == 18 and len(result.losses) == 18
    assert result.tokens == 3 * 192 * (dt.WORD_LETTERS + 1)
    assert sum(result.losses[-3:]) / 3 < 0.5 * sum(result.losses[:3]) / 3, result.losses


def _nll(model, tok, examples, *, prompt_too: bool) -> float:
    """Token-mean NLL by a plain full-logits forward, one example at a time (no padding)."""
    total, count = 0.0, 0
    for p, c in examples:
        p_ids, c_ids = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"] + [EOS_ID]
        ids = torch.tensor([p_ids + c_ids])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        keep = nll if prompt_too else nll[len(p_ids) - 1 :]
        total, count = total + keep.sum().item(), count + len(keep)
    return total / count


def test_first_loss_is_the_completion_only_nll():
    tok = tiny_tokenizer()
    model = tiny_qwen2(len(tok), seed=1)
    examples = [("sort dbca: ", "abcd"), ("sort ji: ", "ij"), ("a long prompt, with many tokens: ", "x")]
    before = copy.deepcopy(model)
    result = sft(model, tok, examples, config=SFTConfig(batch_size=len(examples)))
    with torch.no_grad():
        completion_only = _nll(before, tok, examples, prompt_too=False)
        everything = _nll(before, tok, examples, prompt_too=True)
    assert result.tokens == 5 + 3 + 2
    assert result.losses[0] == pytest.approx(completion_only, rel=1e-4)
    assert abs(everything - completion_only) > 0.1  # the check above would catch prompt tokens in the loss


def test_deterministic_under_a_seed_and_caller_rng_untouched():
    tok = tiny_tokenizer()
    examples = dt.demonstrations(64, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [sft(tiny_qwen2(len(tok), seed=0), tok, examples, config=SFTConfig(batch_size=16)).losses for _ in "ab"]
    assert runs[0] == runs[1]
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input_names_the_argument():
    tok = tiny_tokenizer()
    model = tiny_qwen2(len(tok))
    with pytest.raises(ValueError, match="examples must not be empty"):
        sft(model, tok, [])
    with pytest.raises(TypeError, match=r"examples\[1\]\.completion"):
        sft(model, tok, [("a", "b"), ("a", 1)])
    with pytest.raises(TypeError, match=r"examples\[0\] must be a 2-tuple"):
        sft(model, tok, [("a", "b", "c")])
    with pytest.raises(ValueError, match=r"examples\[0\] has .*config.max_length=4"):
        sft(model, tok, [("sort abcd: ", "abcd")], config=SFTConfig(max_length=4))
    with pytest.raises(TypeError, match="model must be a causal LM"):
        sft(tiny_reward_model(len(tok)), tok, [("a", "b")])
    with pytest.raises(TypeError, match="config"):
        sft(model, tok, [("a", "b")], config=dict(lr=1))
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)
