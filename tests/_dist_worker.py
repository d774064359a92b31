"""Run under torchrun by tests/test_distributed.py (gloo, CPU).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py update OUT.json``:
one PPO update of a tiny policy and critic under FSDP2 and under DDP, each rank holding half of a fixed
batch, against the same update in one process on the whole batch (rank 0 computes it); plus the
global statistics. Writes the differences to OUT.json.

``python tests/_dist_worker.py models FOLDER``: a tiny policy, reward model and prompt files for
``torchrun -m fastppo train`` (the checkpoint/resume tests, and the GPU check's NCCL smoke run).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from fastppo.tiny import tiny_qwen2, tiny_reward_model
from fastppo.trainer import PPOConfig
from fastppo.trainer.distributed import Dist, RolloutReplica, local_tensor, masked_mean, masked_whiten, wrap
from fastppo.trainer.experience import Experience
from fastppo.trainer.metrics import Mean
from fastppo.trainer.models import LogProbHead, ValueModel
from fastppo.trainer.update import Learner, make_optimizer, make_scheduler, ppo_update

PROMPTS = ["Hi ", "Say: ", "abc", "Once", "x=", "la la ", "Yo", "Q:"]
EVAL_PROMPTS = ["Yo", "Q:", "ok "]


def _batch(B=4, P=3, N=6, vocab=96):
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(3, vocab, (B, P + N), generator=g)
    attn = torch.ones(B, P + N, dtype=torch.bool)
    attn[0, 0] = False  # a left-padded prompt
    cmask = torch.ones(B, N, dtype=torch.bool)
    for i, n in enumerate((6, 2, 4, 5)):  # ragged completions; rank 1's share is shorter than rank 0's
        cmask[i, n:] = False
    attn[:, P:] = cmask
    return Experience(
        seq,
        attn,
        cmask,
        P,
        logprobs=-torch.rand(B, N, generator=g) * 3 - 2,
        advantages=torch.randn(B, N, generator=g) * cmask,
        values=torch.randn(B, N, generator=g) * 0.1,
        returns=torch.randn(B, N, generator=g),
    )


def _learner(head, critic, config):
    """AdamW (lr 1e-2, constant) on the policy's head and on the critic, as the trainer builds them."""

    def pair(module):
        opt = make_optimizer(module.parameters(), 1e-2, config.ppo)
        return opt, make_scheduler(opt, kind="constant", warmup_steps=0, total_steps=1)

    return Learner(head, *pair(head), critic, *pair(critic))


def _full(module):
    return {k: local_tensor(v).detach().clone() for k, v in module.state_dict().items()}


def update(out_path):
    d = Dist(enabled=True)
    config = PPOConfig.from_dict(
        dict(rollout_batch_size=4, samples_per_prompt=1, micro_batch_size=1, device="cpu", ent_coef=0.01)
    ).validate()
    exp = _batch()
    torch.manual_seed(0)
    policy0, critic_body = tiny_qwen2(96, seed=0), tiny_qwen2(96, seed=1)
    critic0 = ValueModel(critic_body.model, 64)
    result = {}
    if d.is_main:  # the single-process step on the whole batch
        policy, critic = copy.deepcopy(policy0), copy.deepcopy(critic0)
        learner = _learner(LogProbHead(policy), critic, config)
        meter = Mean()
        ppo_update(exp, learner, config, rng=torch.Generator().manual_seed(0), meter=meter)
        single = {"policy": _full(policy), "critic": _full(critic)}
        result["single_metrics"] = meter.result()
    share = slice(d.rank * 2, d.rank * 2 + 2)
    mine = Experience(**{k: (v[share] if isinstance(v, torch.Tensor) else v) for k, v in vars(exp).items()})
    for parallelism in ("fsdp", "ddp"):
        policy, critic = copy.deepcopy(policy0), copy.deepcopy(critic0)
        replica = RolloutReplica(policy) if parallelism == "fsdp" else None
        head = wrap(LogProbHead(policy), parallelism, torch.device("cpu"))
        critic = wrap(critic, parallelism, torch.device("cpu"))
        learner = _learner(head, critic, config)
        meter = Mean()
        ppo_update(mine, learner, config, rng=torch.Generator().manual_seed(0), meter=meter, dist=d)
        metrics = meter.result(d)
        got = {"policy": _full(policy), "critic": _full(getattr(critic, "module", critic))}
        if replica is not None:
            replica.refresh(policy)
            got["replica"] = _full(replica.model)
        if d.is_main:
            diffs = {}
            for part, state in got.items():
                ref = single["policy" if part == "replica" else part]
                diffs[part] = max(float((state[k] - ref[k]).abs().max()) for k in ref)
            moved = max(float((single["policy"][k] - policy0.state_dict()[k]).abs().max()) for k in single["policy"])
            result[parallelism] = {"max_diff": diffs, "moved": moved, "metrics": metrics}
    # global statistics: each rank's half against the whole
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    from fastppo.advantages import masked_mean as one_mean
    from fastppo.advantages import masked_whiten as one_whiten

    w = masked_whiten(x[share], exp.completion_mask[share], d)
    whole = d.gather(w)
    m = masked_mean(x[share], exp.completion_mask[share], d)
    try:
        from fastppo import linear_logprobs_and_entropy

        head = wrap(LogProbHead(copy.deepcopy(policy0)), "fsdp", torch.device("cpu"))
        weight = head.model.get_output_embeddings().weight  # outside the forward: a shard
        linear_logprobs_and_entropy(torch.randn(2, 64), weight, torch.tensor([1, 2]))
        dtensor_error = None
    except TypeError as e:
        dtensor_error = str(e)
    if d.is_main:
        result["whiten_diff"] = float((whole - one_whiten(x, exp.completion_mask)).abs().max())
        result["mean_diff"] = float((m - one_mean(x, exp.completion_mask)).abs())
        result["dtensor_error"] = dtensor_error
        with open(out_path, "w") as f:
            json.dump(result, f)


def make_models(folder):
    """``folder/policy``, ``folder/rm`` (tiny, saved with their tokenizer), ``prompts.txt``, ``eval.txt``:
    what ``fastppo train --model ... --reward-model ... --prompts ...`` needs."""
    import pathlib

    from fastppo.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_qwen2(len(tok), seed=0).save_pretrained(f"{folder}/policy")
    tok.save_pretrained(f"{folder}/policy")
    tiny_reward_model(len(tok), seed=3).save_pretrained(f"{folder}/rm")
    tok.save_pretrained(f"{folder}/rm")
    pathlib.Path(folder, "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    pathlib.Path(folder, "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *rest = sys.argv[1:]
    if mode == "models":
        make_models(*rest)
        sys.exit(0)
    dist.init_process_group("gloo")
    try:
        update(*rest)
    finally:
        dist.destroy_process_group()
