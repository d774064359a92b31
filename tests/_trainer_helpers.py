"""Shared pieces of the trainer tests: tiny configs, reward functions, saved model folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastppo.tiny import tiny_qwen2, tiny_reward_model, tiny_tokenizer
from fastppo.trainer import PPOConfig

PROMPTS = ["Hi ", "Say: ", "abc", "Once", "x=", "la la "]
# the tiny tokenizer's ids of "=", "a" and ".": extra stop tokens, so that completions end at ragged lengths
STOP_IDS = [84, 14, 79]
EVAL_PROMPTS = ["Yo", "Q:", "ok "]


# what differs between two runs of the same steps: wall-clock times and the process's memory
UNTIMED = {"tokens_per_s", "peak_mem_mb"}


def untimed(record: dict) -> dict:
    """A metrics record without its timings and memory (``time_*``, :data:`UNTIMED`), comparable with ``==``:
    a NaN (``reward_length_corr`` of equal-length completions) becomes the string ``"nan"``, since
    ``nan != nan`` would fail the comparison of two identical runs."""
    nan = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {k: nan(v) for k, v in record.items() if not k.startswith("time_") and k not in UNTIMED}


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: the tiny models' matmuls are too small to gain from threads, and
    on a shared 2-core machine two threads per process oversubscribe it (3x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vowels(prompts, completions, **columns):
    """Fraction of vowels in each completion."""
    return [sum(c in "aeiouAEIOU" for c in t) / max(len(t), 1) for t in completions]


def small_config(tmp_path, **fields) -> PPOConfig:
    """A config that runs a step in well under a second on a CPU."""
    values = dict(
        rollout_batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=5,
        max_steps=2,
        ppo_epochs=1,
        num_minibatches=2,
        learning_rate=1e-3,
        critic_learning_rate=1e-3,
        output_dir=str(tmp_path / "run"),
        eval_every=1,
        progress_bar=False,
        save_final=False,
        device="cpu",
        stop_token_ids=STOP_IDS,
    )
    values.update(fields)
    return PPOConfig.from_dict(values).validate()


def save_policy(folder, *, seed=0, **kw):
    """A tiny Qwen2 policy and its tokenizer, saved with save_pretrained; returns the folder."""
    tok = tiny_tokenizer()
    tiny_qwen2(len(tok), seed=seed, **kw).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_reward_model(folder, *, seed=3, tokenizer=True):
    tok = tiny_tokenizer()
    tiny_reward_model(len(tok), seed=seed).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]
