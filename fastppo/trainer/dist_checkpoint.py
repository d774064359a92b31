"""Sharded checkpoints of a torchrun run, with ``torch.distributed.checkpoint`` (DCP).

``output_dir/checkpoint-<step>/`` of a torchrun run holds:

* ``weights/``: the policy's and critic's weights and their optimizers' states, every rank writing its
  own shards (``HuggingFaceStorageWriter``: safetensors files whose headers are DCP's metadata, so
  loading unpickles nothing — DCP's default ``FileSystemReader`` would unpickle a ``.metadata`` file;
  a torch without that writer falls back to the default one: trust boundary in :func:`_reader`);
  a run on any number of ranks can load them (DCP reshards);
* ``rank-<r>.json`` + ``rank-<r>.safetensors``: rank ``r``'s :meth:`PPOTrainer.state_dict` (its RNG
  streams; the data position, KL controller and reward normalizer are the same on every rank);
* ``state.json`` (written last, by rank 0): format, step, world size, the schedulers' states and the
  optimizers' hyper-parameters (the non-tensor part of their state dicts); ``config.yaml``.

Atomic across ranks: all ranks write into ``.tmp-checkpoint-<step>``, meet at a barrier, then rank 0
writes ``state.json``, fsyncs and renames the folder; a second barrier keeps every rank until the
checkpoint is in place. Resumed on the same world size, the run continues exactly; on another, each
rank's RNG streams are re-seeded from (seed, rank, step) (the batch split differs anyway).
"""

from __future__ import annotations

import json
import pathlib

import torch

from fastppo.trainer.checkpoint import PREFIX, TMP_PREFIX, _fsync, _remove_tmp, decode, encode, publish

FORMAT = 1
_MODULES = (  # (name, module attribute, optimizer attribute, scheduler attribute) of a Learner
    ("policy", "policy", "policy_optimizer", "policy_scheduler"),
    ("critic", "critic", "critic_optimizer", "critic_scheduler"),
)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _writer(path: pathlib.Path):
    """DCP's safetensors writer, every rank writing its own shards. Its flag was ``save_sharded`` in
    early releases and is ``save_distributed`` since; without the class (torch < 2.8), the default
    ``FileSystemWriter``, whose ``.metadata`` file is a pickle (see :func:`_reader`)."""
    import inspect

    import torch.distributed.checkpoint as dcp

    cls = getattr(dcp, "HuggingFaceStorageWriter", None)
    if cls is None:
        return dcp.FileSystemWriter(str(path))
    params = inspect.signature(cls.__init__).parameters
    flag = next((f for f in ("save_distributed", "save_sharded") if f in params), None)
    return cls(str(path), **({flag: True} if flag else {}))


def _reader(path: pathlib.Path):
    """The reader of :func:`_writer`'s files. A ``FileSystemWriter`` checkpoint unpickles its
    ``.metadata`` on load: only load such a checkpoint if you trust whoever wrote the folder."""
    import torch.distributed.checkpoint as dcp

    if (path / ".metadata").is_file():
        return dcp.FileSystemReader(str(path))
    return dcp.HuggingFaceStorageReader(str(path))


def _states(learner) -> tuple[dict, dict]:
    """``(tensors, rest)``: the flat model + optimizer state dicts of ``learner``'s modules, keyed
    ``<name>.<fqn>`` and ``<name>_optimizer.<key>``, split into (D)tensors and everything else."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {}
    for name, mod, opt, _ in _MODULES:
        module, optimizer = getattr(learner, mod), getattr(learner, opt)
        if module is None:
            continue
        flat.update({f"{name}.{k}": v for k, v in get_model_state_dict(module).items()})
        # (this also creates a fresh optimizer's state, so that a load has every entry to fill)
        state = get_optimizer_state_dict(module, optimizer, options=_options())
        flat.update({f"{name}_optimizer.{k}": v for k, v in state.items()})
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


def save_checkpoint(trainer, *, keep_last: int | None = None) -> pathlib.Path:
    """Every rank calls it: write ``output_dir/checkpoint-<step>`` (module docstring); keep the newest
    ``keep_last``. Returns the folder."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    dist, learner = trainer.dist, trainer.learner
    root = pathlib.Path(trainer.config.run.output_dir)
    step = trainer.step_count
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{PREFIX}{step}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_tmp(root)  # a save killed earlier
        tmp.mkdir()
    dist.barrier()
    tensors, rest = _states(learner)
    dcp.save(tensors, storage_writer=_writer(tmp / "weights"))
    rank_tensors: dict = {}
    rank_state = encode(trainer.state_dict(), rank_tensors)
    save_file(rank_tensors, str(tmp / f"rank-{dist.rank}.safetensors"))
    with open(tmp / f"rank-{dist.rank}.json", "w") as f:
        json.dump(rank_state, f)
    for p in (tmp / f"rank-{dist.rank}.json", tmp / f"rank-{dist.rank}.safetensors"):
        _fsync(p)
    dist.barrier()  # every rank's shards are written
    if dist.is_main:
        schedulers = {n: getattr(learner, s).state_dict() for n, m, _, s in _MODULES if getattr(learner, m) is not None}
        meta = {
            "format": FORMAT,
            "distributed": True,
            "step": step,
            "world_size": dist.world_size,
            "parallelism": trainer.config.distributed.parallelism,
            "schedulers": schedulers,
            "optimizer_hyperparameters": encode(rest, {}),
        }
        trainer.config.to_yaml(tmp / "config.yaml")
        with open(tmp / "state.json", "w") as f:  # last: its presence marks the folder complete
            json.dump(meta, f)
        publish(tmp, final, keep_last=keep_last)
    dist.barrier()  # no rank goes on before the checkpoint is in place
    return final


def load_checkpoint(trainer, folder) -> list[str]:
    """Every rank calls it: restore ``trainer`` from a checkpoint of a torchrun run on any world size.
    Returns notes for the console."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from fastppo.trainer.distributed import RANK_SEED_STRIDE

    dist, learner = trainer.dist, trainer.learner
    folder = pathlib.Path(folder)
    with open(folder / "state.json") as f:
        meta = json.load(f)
    if not meta.get("distributed"):
        raise ValueError(
            f"{folder} was written by a single-process run: resume it without torchrun (or start this run anew)"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    has_critic = "critic" in meta["schedulers"]  # one scheduler per module saved
    if (learner.critic is not None) != has_critic:
        raise ValueError(f"{folder}: the checkpoint {'has' if has_critic else 'has no'} critic but this run differs")
    tensors, _ = _states(learner)
    dcp.load(tensors, storage_reader=_reader(folder / "weights"))
    flat = {**tensors, **decode(meta["optimizer_hyperparameters"], {})}
    for name, mod, opt, sched in _MODULES:
        module = getattr(learner, mod)
        if module is None:
            continue
        cut = len(name) + 1
        model_state = {k[cut:]: v for k, v in flat.items() if k.startswith(f"{name}.")}
        cut_o = len(name) + len("_optimizer.")
        optim_state = {k[cut_o:]: v for k, v in flat.items() if k.startswith(f"{name}_optimizer.")}
        set_model_state_dict(module, model_state)
        set_optimizer_state_dict(module, getattr(learner, opt), optim_state, options=_options())
        getattr(learner, sched).load_state_dict(meta["schedulers"][name])
    same_world = meta["world_size"] == dist.world_size
    rank = dist.rank if same_world else 0
    state = decode(
        json.loads((folder / f"rank-{rank}.json").read_text()), load_file(str(folder / f"rank-{rank}.safetensors"))
    )
    trainer.load_state_dict(state)
    notes = []
    if not same_world:
        # rank 0's streams are not this rank's: fresh, deterministic ones for every rank
        seed = trainer.config.run.seed + dist.rank * RANK_SEED_STRIDE + 7919 * trainer.step_count
        trainer.sample_rng.manual_seed(seed)
        trainer.update_rng.manual_seed(seed + 1)
        notes.append(
            f"resume: the checkpoint was written by {meta['world_size']} ranks, this run has {dist.world_size}: "
            "weights, optimizers and data position restored; sampling streams re-seeded"
        )
    if trainer.replica is not None:
        trainer.replica.refresh(trainer.policy)
    return notes
