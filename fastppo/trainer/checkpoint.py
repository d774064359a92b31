"""Checkpoints of a PPO run: written atomically, the newest ``keep_last`` kept, loaded without pickle.

``output_dir/checkpoint-<step>/`` holds:

* ``policy.safetensors``, ``critic.safetensors`` (gae): the modules' weights (``safetensors.torch.save_model``,
  so tied weights are stored once);
* ``state.safetensors`` + ``state.json``: everything else, as JSON with its tensors in the safetensors
  file (:func:`encode`): :meth:`PPOTrainer.state_dict` (step, data position, every RNG: Python, numpy,
  torch CPU and CUDA, the sampling and mini-batch generators, which also seed the Generator; the KL
  controller, the reward normalizer) and the optimizers' and schedulers' ``state_dict()``;
* ``config.yaml``: the resolved config of the run that wrote it.

A checkpoint is written into ``output_dir/.tmp-checkpoint-<step>``, every file fsynced, then renamed
(``os.replace``): a folder named ``checkpoint-<step>`` is complete, and ``state.json`` (written last) is
checked besides. Older checkpoints are deleted only once the new one is in place. Loading reads
safetensors and JSON only: no pickle, nothing executable.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import torch

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
FORMAT = 1
_NAME = re.compile(rf"{PREFIX}(\d+)")
_TAGS = ("__tensor__", "__tuple__", "__items__")


# --------------------------------------------------------------------------------------------------
# nested states <-> JSON + tensors
# --------------------------------------------------------------------------------------------------
def encode(obj, tensors: dict, path: str = "state"):
    """A JSON-able copy of ``obj`` (dicts, lists, tuples, numbers, strings, None, tensors); each tensor
    is put into ``tensors[path]`` (on the CPU) and replaced by ``{"__tensor__": path}``, a tuple by
    ``{"__tuple__": [...]}``, a dict with non-string keys (an optimizer's ``state``) by
    ``{"__items__": [[k, v], ...]}``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        items = [(k, encode(v, tensors, f"{path}.{k}")) for k, v in obj.items()]
        for k, _ in items:
            if not isinstance(k, (str, int, float, bool)) or k in _TAGS:
                raise TypeError(f"checkpoint: {path} has a key {k!r} that cannot be stored")
        if all(isinstance(k, str) for k, _ in items):
            return dict(items)
        return {"__items__": [list(kv) for kv in items]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: {path} is a {type(obj).__name__}; only tensors, numbers, strings, lists and dicts")


def decode(obj, tensors: dict):
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and next(iter(obj)) in _TAGS:
            ((tag, value),) = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(decode(v, tensors) for v in value)
            return {k: decode(v, tensors) for k, v in value}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------
# finding checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoints(output_dir) -> list[tuple[int, pathlib.Path]]:
    """The complete checkpoints of ``output_dir`` as ``(step, folder)``, oldest first."""
    root = pathlib.Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir) -> pathlib.Path | None:
    """The complete checkpoint of the highest step in ``output_dir`` (None: none)."""
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_checkpoints(output_dir) -> list[pathlib.Path]:
    """Delete every checkpoint and leftover temporary folder of ``output_dir`` (a fresh run starts the
    folder over); returns the checkpoints removed."""
    root = pathlib.Path(output_dir)
    removed = [p for _, p in checkpoints(root)]
    for p in removed:
        shutil.rmtree(p)
    _remove_tmp(root)
    return removed


def _remove_tmp(root: pathlib.Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def _optimizer_states(learner) -> dict:
    names = ("policy_optimizer", "policy_scheduler", "critic_optimizer", "critic_scheduler")
    return {n: getattr(learner, n).state_dict() for n in names if getattr(learner, n) is not None}


def save_checkpoint(trainer, *, keep_last: int | None = None) -> pathlib.Path:
    """Write ``output_dir/checkpoint-<step>`` of ``trainer`` atomically; then delete all but the newest
    ``keep_last`` checkpoints (None: keep all). Returns the folder."""
    from safetensors.torch import save_file, save_model

    root = pathlib.Path(trainer.config.run.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_tmp(root)  # a save killed earlier
    step = trainer.step_count
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{PREFIX}{step}"
    tmp.mkdir()
    save_model(trainer.policy, str(tmp / "policy.safetensors"))
    if trainer.critic is not None:
        save_model(trainer.critic, str(tmp / "critic.safetensors"))
    tensors: dict = {}
    state = encode({"trainer": trainer.state_dict(), **_optimizer_states(trainer.learner)}, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    trainer.config.to_yaml(tmp / "config.yaml")
    with open(tmp / "state.json", "w") as f:  # last: its presence marks the folder complete
        json.dump({"format": FORMAT, "step": step, "state": state}, f)
    return publish(tmp, final, keep_last=keep_last)


def publish(tmp: pathlib.Path, final: pathlib.Path, *, keep_last: int | None) -> pathlib.Path:
    """Make the written folder ``tmp`` the checkpoint ``final``: fsync every file and folder in it, rename
    it into place, then delete all but the newest ``keep_last`` checkpoints beside it."""
    root = final.parent
    for p in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that list them
        _fsync(p)
    _fsync(tmp)
    old = None
    if final.exists():  # the same step saved twice (a resumed run stopped at once): swap, then delete
        old = tmp.with_name(f"{tmp.name}-old")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    if old is not None:
        shutil.rmtree(old)
    if keep_last is not None:
        for _, p in checkpoints(root)[:-keep_last]:
            if p != final:
                shutil.rmtree(p)
    return final


def load_checkpoint(trainer, folder) -> int:
    """Restore ``trainer`` (weights, optimizers, schedulers, :meth:`PPOTrainer.load_state_dict`) from a
    checkpoint folder; returns its step."""
    from safetensors.torch import load_file, load_model

    folder = pathlib.Path(folder)
    with open(folder / "state.json") as f:
        meta = json.load(f)
    if meta.get("distributed"):
        raise ValueError(
            f"{folder} was written by a torchrun run ({meta.get('world_size')} ranks): resume it under torchrun "
            "(`torchrun --nproc-per-node N -m fastppo train ... --resume`, any N)"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    load_model(trainer.policy, str(folder / "policy.safetensors"))
    has_critic = (folder / "critic.safetensors").is_file()
    if (trainer.critic is not None) != has_critic:
        raise ValueError(
            f"{folder}: the checkpoint {'has' if has_critic else 'has no'} critic but this run "
            f"({trainer.config.ppo.advantage!r}) {'has none' if has_critic else 'has one'}"
        )
    if has_critic:
        load_model(trainer.critic, str(folder / "critic.safetensors"))
    state = decode(meta["state"], load_file(str(folder / "state.safetensors")))
    for name, value in state.items():
        if name != "trainer":
            getattr(trainer.learner, name).load_state_dict(value)
    trainer.load_state_dict(state["trainer"])
    return trainer.step_count


def config_changes(folder, config) -> list[str]:
    """``"field: old -> new"`` for each field of ``config`` that differs from the checkpoint's (``resume`` aside)."""
    from fastppo.trainer.config import PPOConfig

    old = PPOConfig.from_yaml(pathlib.Path(folder) / "config.yaml").to_dict()
    new = config.to_dict()
    return [
        f"{k}: {old[s][k]!r} -> {v!r}"
        for s, fields in new.items()
        for k, v in fields.items()
        if k != "resume" and old[s].get(k) != v
    ]


def _fsync(path: pathlib.Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk, so a rename never outlives its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
