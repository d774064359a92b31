"""The built-in demo (``fastppo train`` with no arguments, ``python -m fastppo.demo``) runs every stage."""

import math

import pytest

import fastppo.demo as demo
from tests._trainer_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    *("--iterations", "3", "--batch-size", "16", "--sft-examples", "320", "--rm-pairs", "640"),
    *("--rm-eval-pairs", "100", "--train-prompts", "64", "--eval-prompts", "16", "--samples-shown", "2"),
]


def test_demo_runs_every_stage_end_to_end(capsys, tmp_path):
    assert demo.main([*SMALL, "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("[1/4] SFT warm-up", "[2/4] reward model", "[3/4] PPO", "[4/4] held-out prompts"):
        assert stage in out, out
    assert "after SFT" in out and "after PPO" in out and "true score" in out and "RM score" in out
    assert out.count("(answer '") == 2
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_report():
    cfg = demo.DemoConfig(
        iterations=3,
        batch_size=16,
        sft_examples=320,
        rm_pairs=640,
        rm_eval_pairs=100,
        train_prompts=64,
        eval_prompts=16,
    )
    report = demo.run(cfg, log=lambda line: None)
    assert set(report["seconds"]) == {"sft", "reward_model", "ppo", "eval"}
    assert 0.5 < report["rm_eval_accuracy"] <= 1.0  # above chance even at this size
    assert len(report["history"]) == 3
    for when in ("before", "after"):
        r = report[when]
        assert 0 <= r["true_score"] <= 1 and math.isfinite(r["rm_score"]) and len(r["completions"]) == 16
    # the warm-up learned the format: completions are mostly the task's letters, about a word long. An
    # untrained policy scores ~0.02 here; this short warm-up 0.12-0.20 on 128 held-out prompts (seeds 0, 1),
    # and a 16-prompt estimate of it moves by ~0.05 with the sampling stream: 0.1 is 5x chance, not luck.
    assert report["before"]["true_score"] > 0.1


def test_fastppo_train_without_model_runs_the_demo(monkeypatch):
    from fastppo.trainer.cli import main

    seen = []
    monkeypatch.setattr(demo, "pipeline", lambda config, sizes=None, log=print: seen.append(config))
    assert main(["--max-steps", "7"]) == 0
    (config,) = seen
    assert config.run.max_steps == 7  # the flag over the preset
    assert config.rollout.rollout_batch_size == demo.PRESET["rollout_batch_size"]
    assert config.rollout.max_new_tokens == demo.task.MAX_NEW_TOKENS
