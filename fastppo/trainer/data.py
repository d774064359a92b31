"""Prompt datasets: loading (.jsonl / .txt / Python lists), tokenization with a length limit, and the
order in which a run visits them (a resumable sampler)."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch


@dataclass
class PromptDataset:
    """``prompts[i]`` (text), ``columns[name][i]`` (the record's other fields, None where a record lacks
    one) and ``ids[i]`` (the prompt's token ids after tokenization and truncation)."""

    prompts: list
    columns: dict
    ids: list

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def max_length(self) -> int:
        return max(len(i) for i in self.ids)


def read_prompts(source, *, column: str = "prompt") -> tuple[list, dict]:
    """``(prompts, columns)`` from a ``.jsonl`` file (objects with a ``column`` field), a ``.txt`` file (one
    prompt a line, blank lines skipped), a list of strings or a list of dicts."""
    what = "prompts"
    if isinstance(source, (str, pathlib.Path)):
        path = pathlib.Path(source)
        what = str(path)
        if not path.is_file():
            raise ValueError(f"prompts file {path} does not exist")
        if path.suffix == ".txt":
            source = [line for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix in (".jsonl", ".json"):
            source = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    source.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        else:
            raise ValueError(f"prompts file {path} must be .jsonl or .txt")
    if not isinstance(source, (list, tuple)) or not source:
        raise ValueError(f"{what}: expected a non-empty list of prompts")
    if all(isinstance(s, str) for s in source):
        return list(source), {}
    prompts, names = [], []
    for i, record in enumerate(source):
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise ValueError(f"{what}: record {i} has no string field {column!r}: {str(record)[:200]}")
        prompts.append(record[column])
        names += [k for k in record if k != column and k not in names]
    columns = {k: [r.get(k) for r in source] for k in names}
    return prompts, columns


def tokenize_prompts(
    prompts: list, columns: dict, tokenizer, *, max_length: int | None = None, truncate: bool = False
) -> PromptDataset:
    """Tokenize (with the tokenizer's special tokens, e.g. BOS); a prompt longer than ``max_length`` is an
    error naming it, or loses its first tokens with ``truncate``."""
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) has no token: every prompt needs at least one")
        if max_length is not None and len(row) > max_length:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens, more than max_prompt_length={max_length} "
                    f"(set truncate_prompts to cut it): {prompts[i][:100]!r}"
                )
            ids[i] = row[-max_length:]
    return PromptDataset(list(prompts), columns, [list(r) for r in ids])


class PromptSampler:
    """Batches of prompt indices, epoch after epoch: a fresh permutation per epoch (seeded by
    ``seed + epoch``, so a run's order depends on nothing else), or file order without ``shuffle``.
    Its position (epoch, offset) is its whole state."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._cache = (None, None)

    def _order(self, epoch: int) -> list[int]:
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
            self._cache = (epoch, order)
        return self._cache[1]

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.offset : self.offset + self.batch_size - len(out)]
            out += take
            self.offset += len(take)
            if self.offset >= self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
