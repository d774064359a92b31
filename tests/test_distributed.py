"""Data-parallel training under torchrun, on the CPU with gloo and 2 processes.

One PPO update under FSDP2 and under DDP, each rank holding half of a batch, gives the parameters of
the same update in one process on the whole batch; the global statistics equal the one-process ones;
a 2-rank run saves sharded checkpoints, resumes on 2 ranks with exactly the uninterrupted run's
metrics, and resumes on 1 rank; metrics report ``world_size``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests._trainer_helpers import untimed

WORKER = pathlib.Path(__file__).with_name("_dist_worker.py")
ROOT = WORKER.parent.parent


def _torchrun(n: int, *args, timeout=300):
    """``torchrun --nproc-per-node n ARGS`` (a script, or ``-m fastppo train ...``); its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    out = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    return out


def _train(n: int, folder, out, steps: int, *flags):
    """``torchrun -m fastppo train`` of the tiny policy against the tiny reward model: gae (a critic from
    the reward model), adaptive KL, reward normalization, reference and reward model sharded."""
    args = dict(
        model=folder / "policy",
        reward_model=folder / "rm",
        prompts=folder / "prompts.txt",
        eval_prompts=folder / "eval.txt",
        rollout_batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=4,
        max_steps=steps,
        num_minibatches=2,
        learning_rate=1e-3,
        critic_learning_rate=1e-3,
        output_dir=out,
        eval_every=0,
        save_every=1,
        keep_last="none",
        device="cpu",
        adaptive_kl="true",
        normalize_reward="true",
        reference_placement="shard",
        reward_model_placement="shard",
        save_final="true",
    )
    argv = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]
    return _torchrun(n, "-m", "fastppo", "train", *argv, *flags).stdout


def _metrics(folder):
    return [json.loads(line) for line in open(pathlib.Path(folder) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def update(tmp_path_factory):
    path = tmp_path_factory.mktemp("update") / "update.json"
    _torchrun(2, WORKER, "update", path)
    return json.loads(path.read_text())


@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_one_update_on_two_ranks_equals_the_one_process_update(update, parallelism):
    r = update[parallelism]
    assert r["moved"] > 1e-3  # the update changed the weights: the comparison below can fail
    for part, diff in r["max_diff"].items():  # policy, critic (and, under FSDP, the rollout replica)
        assert diff < 1e-6, (parallelism, part, diff)
    single = update["single_metrics"]
    assert set(r["metrics"]) == set(single)
    for k, v in single.items():  # token-weighted over both ranks, as over the whole batch
        assert r["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_global_whitening_and_means_equal_the_one_process_ones(update):
    assert update["whiten_diff"] < 1e-6
    assert update["mean_diff"] < 1e-6


def test_a_sharded_weight_passed_to_an_op_is_a_clear_error(update):
    msg = update["dtensor_error"]
    assert msg is not None and msg.startswith("weight is a DTensor") and "full_tensor" in msg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    subprocess.run([sys.executable, str(WORKER), "models", root], check=True, cwd=ROOT)
    a = root / "a"
    out = {"a": a, "a_log": _train(2, root, a, 2)}  # checkpoints after steps 1 and 2
    for name, ranks, steps in (("b", 2, 2), ("c", 1, 3)):  # resumed from step 1
        shutil.copytree(a, root / name)
        shutil.rmtree(root / name / "checkpoint-2")
        out[name] = root / name
        out[f"{name}_log"] = _train(ranks, root, root / name, steps, "--resume")
    return out


def test_a_two_rank_run_writes_sharded_checkpoints_without_pickle(runs):
    a = _metrics(runs["a"])
    assert "2 ranks (fsdp)" in runs["a_log"]
    assert [m["step"] for m in a] == [1, 2] and all(m["world_size"] == 2 for m in a)
    ck = runs["a"] / "checkpoint-1"
    names = {p.name for p in ck.iterdir()}
    assert {"state.json", "config.yaml", "weights", "rank-0.json", "rank-1.json"} <= names
    files = [p for p in ck.rglob("*") if p.is_file()]
    assert len(list((ck / "weights").glob("*.safetensors"))) == 2  # one shard file per rank
    assert all(p.suffix in (".json", ".safetensors", ".yaml") for p in files), files  # nothing to unpickle


def test_resumed_on_two_ranks_it_logs_exactly_the_uninterrupted_run(runs):
    assert "resumed from" in runs["b_log"]
    a, b = _metrics(runs["a"]), _metrics(runs["b"])
    assert [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert untimed(x) == untimed(y)


def test_resumed_on_one_rank_it_continues_and_saves_a_loadable_policy(runs):
    assert "written by 2 ranks, this run has 1" in runs["c_log"]
    c = _metrics(runs["c"])
    assert [m["step"] for m in c] == [1, 2, 3]
    assert [m["world_size"] for m in c] == [2, 1, 1]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(runs["c"] / "final") is not None


def test_a_torchrun_checkpoint_is_refused_by_a_single_process_resume(runs, tmp_path):
    from fastppo.trainer.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match=r"written by a torchrun run \(2 ranks\): resume it under torchrun"):
        load_checkpoint(None, runs["a"] / "checkpoint-1")


def test_batch_sizes_must_split_over_the_ranks():
    from fastppo.trainer import PPOConfig
    from fastppo.trainer.distributed import check_world

    cfg = PPOConfig.from_dict(dict(rollout_batch_size=6, samples_per_prompt=2, num_minibatches=4)).validate()
    with pytest.raises(ValueError, match=r"rollout_batch_size=6 .* multiple of the world size 4"):
        check_world(cfg, 4)
    with pytest.raises(ValueError, match="num_minibatches=4 must divide each rank's 6 completions"):
        check_world(cfg, 2)
    check_world(cfg, 1)
