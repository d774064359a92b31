"""Checkpoints: a stopped and resumed run logs exactly the uninterrupted run; atomic writes, keep_last,
incomplete folders ignored, no pickle, a NaN stop keeps the last checkpoint, SIGTERM saves and exits."""

import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastppo.trainer import NonFiniteError, PPOTrainer
from fastppo.trainer.checkpoint import decode, encode, latest_checkpoint
from fastppo.trainer.cli import parse_config
from fastppo.trainer.cli import run as cli_run
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


def _trainer(folders, out, reward="fn", **fields):
    cfg = small_config(out, **fields)
    reward = vowels if reward == "fn" else folders["rm"]
    return PPOTrainer(cfg, folders["policy"], None, reward, train_prompts=PROMPTS, eval_prompts=EVAL_PROMPTS)


def _untimed(path):
    return [untimed(r) for r in read_jsonl(path)]


def _names(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if "checkpoint" in p.name)


def test_states_round_trip_through_json_and_tensors():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1, betas=(0.9, 0.95))
    opt.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)}
    state = {"opt": opt.state_dict(), "python": random.getstate(), "rng": [torch.get_rng_state()], "x": None}
    tensors = {}
    encoded = encode(state, tensors)
    import json

    back = decode(json.loads(json.dumps(encoded)), tensors)
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert torch.equal(back["rng"][0], state["rng"][0]) and back["x"] is None
    with pytest.raises(TypeError, match=r"state\.bad is a set"):
        encode({"bad": {1}}, {})


@pytest.mark.parametrize(("advantage", "reward"), [("gae", "fn"), ("grpo", "rm")])
def test_a_run_killed_and_resumed_logs_exactly_the_uninterrupted_run(tmp_path, folders, monkeypatch, advantage, reward):
    """4 steps straight vs. killed after step 3 with a checkpoint at step 2, then --resume: metrics.jsonl,
    eval.jsonl and samples.jsonl equal, every key but the timings. Every piece of state is exercised: a
    linear learning-rate decay, the adaptive KL controller, the reward normalizer, the sampler, the RNGs."""
    fields = dict(advantage=advantage, max_steps=4, save_every=2, eval_every=1, lr_scheduler="linear",
                  adaptive_kl=True, normalize_reward=True)  # fmt: skip
    _trainer(folders, tmp_path / "full", reward, **fields).train()

    killed = _trainer(folders, tmp_path / "cut", reward, **fields)

    def kill(trainer, metrics):
        if metrics["step"] == 3:  # step 3 is logged but has no checkpoint: the resumed run must drop it
            raise RuntimeError("killed")

    killed.callbacks.append(kill)
    with pytest.raises(RuntimeError, match="killed"):
        killed.train()
    out = tmp_path / "cut" / "run"
    assert _names(out) == ["checkpoint-2"] and len(read_jsonl(out / "metrics.jsonl")) == 3

    def no_pickle(*a, **k):
        raise AssertionError("resuming unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, no_pickle)
    resumed = _trainer(folders, tmp_path / "cut", reward, resume=True, **fields)
    history = resumed.train()
    monkeypatch.undo()
    assert [m["step"] for m in history] == [3, 4]
    for name in ("metrics", "eval", "samples"):
        assert _untimed(out / f"{name}.jsonl") == _untimed(tmp_path / "full" / "run" / f"{name}.jsonl"), name
    assert _names(out) == ["checkpoint-2", "checkpoint-4"]
    files = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert files == {"policy.safetensors", "state.safetensors", "state.json", "config.yaml"} | (
        {"critic.safetensors"} if advantage == "gae" else set()
    )
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")]


def test_an_incomplete_checkpoint_is_ignored_and_keep_last_rotates(tmp_path, folders, monkeypatch, capsys):
    import safetensors.torch

    trainer = _trainer(folders, tmp_path, max_steps=4, save_every=1, keep_last=2, eval_every=0)
    real = safetensors.torch.save_file

    def dies_at_step_4(tensors, filename, *a, **k):
        if trainer.step_count == 4:
            pathlib.Path(filename).write_bytes(b"half a file")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.undo()
    out = tmp_path / "run"
    assert _names(out) == [".tmp-checkpoint-4", "checkpoint-2", "checkpoint-3"]  # 1 deleted after 3 was complete
    (out / "checkpoint-9").mkdir()  # a folder without state.json is not a checkpoint
    assert latest_checkpoint(out) == out / "checkpoint-3"

    capsys.readouterr()
    _trainer(folders, tmp_path, max_steps=4, save_every=1, keep_last=2, eval_every=0, resume=True).train()
    assert "resumed from" in capsys.readouterr().out
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _names(out) == ["checkpoint-3", "checkpoint-4", "checkpoint-9"]  # the leftover temp folder is gone

    # a new run in the folder (no --resume) starts it over: an earlier run's checkpoints would be taken for its own
    _trainer(folders, tmp_path, max_steps=0, save_every=1, eval_every=0).train()
    assert "removed an earlier run's checkpoints (checkpoint-3, checkpoint-4)" in capsys.readouterr().out
    assert _names(out) == ["checkpoint-9"]


def test_a_nan_stop_keeps_the_last_checkpoint_intact(tmp_path, folders, capsys):
    from safetensors.torch import load_file

    trainer = _trainer(folders, tmp_path, max_steps=4, save_every=1, eval_every=0)
    at_step_2 = {}
    trainer.callbacks.append(
        lambda t, m: m["step"] == 2 and at_step_2.update({k: v.clone() for k, v in t.policy.state_dict().items()})
    )
    step = trainer.step

    def nan_from_step_3():
        metrics = step()
        if metrics["step"] >= 3:
            metrics["grad_norm"] = float("nan")
        return metrics

    trainer.step = nan_from_step_3
    assert cli_run(trainer) == 1
    err = capsys.readouterr().err.strip()
    assert "step 3: grad_norm is nan" in err and "checkpoint-2, is intact" in err
    out = tmp_path / "run"
    assert _names(out) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(str(out / "checkpoint-2" / "policy.safetensors"))
    assert saved and all(torch.equal(v, at_step_2[k]) for k, v in saved.items())
    assert not any(torch.equal(v, trainer.policy.state_dict()[k]) for k, v in saved.items() if v.dim() == 2)
    with pytest.raises(NonFiniteError):
        trainer.train()  # as a library call, the error itself


def test_resume_and_checkpoint_flags_parse():
    c = parse_config(["--resume", "--save-every", "5", "--keep-last", "none", "--no-handle-signals"])
    assert c.run.resume is True and c.run.save_every == 5 and c.run.keep_last is None
    assert c.run.handle_signals is False
    assert parse_config([]).run.keep_last == 2


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resume_finishes(tmp_path, folders):
    """A `fastppo train` process gets SIGTERM after its first step: it writes a checkpoint at the step it
    was in, exits 0, and `--resume` runs the remaining steps."""
    (tmp_path / "reward.py").write_text("def score(prompts, completions):\n    return [len(c) for c in completions]\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "run"
    argv = ["train", "--model", folders["policy"], "--reward-fn", f"{tmp_path / 'reward.py'}:score"]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--max-steps", "8", "--save-every", "100"]
    argv += ["--eval-every", "0", "--output-dir", str(out), "--rollout-batch-size", "4", "--samples-per-prompt", "2"]
    argv += ["--max-new-tokens", "4", "--no-progress-bar", "--no-save-final", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastppo", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    steps = [m["step"] for m in read_jsonl(metrics)]
    assert 1 <= len(steps) < 8 and steps == list(range(1, len(steps) + 1))
    assert _names(out) == [f"checkpoint-{steps[-1]}"]
    assert "SIGTERM" in stderr and f"stopped by SIGTERM after step {steps[-1]}" in stdout

    from fastppo.cli import main as fastppo_main

    assert fastppo_main([*argv, "--resume"]) == 0
    assert [m["step"] for m in read_jsonl(metrics)] == list(range(1, 9))
