"""Rewards: a Python function or a Hugging Face reward model scores each completion; shaping follows.

* :class:`RewardFunction`: ``fn(prompts, completions, **columns) -> scores``: ``prompts`` and
  ``completions`` are lists of strings (one per completion, a prompt repeated for each of its samples),
  ``columns`` the prompt dataset's other fields as lists aligned with them (``ground_truth=[...]``).
  ``scores``: a list / tuple / 1-D tensor / numpy array of ``len(completions)`` numbers, or a dict of
  such named components, which are summed (each component's mean is logged as ``reward/<name>``).
* :class:`RewardModel`: an ``AutoModelForSequenceClassification`` with one label, read with its own
  tokenizer: texts are re-tokenized for it (the policy's ids are passed through when the tokenizers are
  the same); the score is the head's output on each text's last token.
* :class:`RewardShaper`: missing-EOS penalty, running normalization (its statistics are part of the
  trainer's state), clipping.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import pathlib

import torch

from fastppo._checks import check_number


class RewardError(RuntimeError):
    """A reward function raised, or returned the wrong number of scores, or a non-finite one."""


def _sample(prompts, completions, i) -> str:
    return f"sample {i}: prompt={prompts[i]!r} completion={completions[i]!r}"


class RewardFunction:
    """Wraps a reward callable: checks what it returns and names the sample that broke it."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"reward must be callable (prompts, completions, **columns), got {type(fn).__name__}")
        self.fn = fn
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, dict]:
        """``(scores [N] float32 on the CPU, {component: [N]})``."""
        n = len(completions)
        try:
            out = self.fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(
                f"reward function {self.name} raised {type(e).__name__}: {e}; "
                f"{self._culprit(prompts, completions, columns)}"
            ) from e
        if isinstance(out, dict):
            if not out:
                raise RewardError(f"reward function {self.name} returned an empty dict")
            comps = {str(k): self._tensor(v, n, prompts, completions, f"component {k!r}") for k, v in out.items()}
            scores = sum(comps.values())
        else:
            comps = {}
            scores = self._tensor(out, n, prompts, completions, "scores")
        return scores, comps

    def _tensor(self, value, n, prompts, completions, what) -> torch.Tensor:
        try:
            t = torch.as_tensor(value if not isinstance(value, torch.Tensor) else value.detach().cpu())
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"reward function {self.name}: {what} is not a list of numbers ({e})") from e
        t = t.to(torch.float32).flatten() if t.dim() <= 1 else t
        if t.dim() != 1 or t.numel() != n:
            raise RewardError(
                f"reward function {self.name} returned {what} of shape {tuple(t.shape)} for {n} completions "
                f"(one number per completion expected); first {_sample(prompts, completions, 0)}"
            )
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise RewardError(
                f"reward function {self.name} returned {what} = {t[i].item()} for {_sample(prompts, completions, i)}"
            )
        return t

    def _culprit(self, prompts, completions, columns) -> str:
        """Call the function on one sample at a time to find the first that raises."""
        for i in range(len(completions)):
            try:
                self.fn(prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
            except Exception:
                return f"it raises on {_sample(prompts, completions, i)}"
        return "every sample passes alone (the failure depends on the batch)"


def load_reward_function(spec: str):
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward_fn must be 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = pathlib.Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward_fn: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward_fn: {module_name} has no attribute {attr!r}")
    return fn


class RewardModel:
    """Scores texts with a sequence-classification model (``num_labels == 1``) and its own tokenizer.

    ``RewardModel(model, tokenizer, *, batch_size=None, same_tokenizer=False)``; ``__call__(texts,
    ids=None)`` returns ``[N]`` float32 on the CPU. With ``same_tokenizer`` and ``ids`` (a list of token
    id lists, the policy's), the ids are scored as they are; else each text is tokenized by
    ``tokenizer``. Inputs are left-padded with explicit position ids, and the score is read at each
    row's last real token (the model's ``score`` head on the body's hidden state, or its own pooling).
    """

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, same_tokenizer: bool = False):
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise ValueError(f"the reward model must have num_labels=1 (one score per text), got {labels}")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.same_tokenizer = same_tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    @torch.no_grad()
    def __call__(self, texts: list[str], ids: list[list[int]] | None = None) -> torch.Tensor:
        if ids is None or not self.same_tokenizer:
            ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        param = next(self.model.parameters())
        n = self.batch_size or max(len(ids), 1)
        # inference mode (no autograd bookkeeping per op) unless sharded: FSDP2 gathers into its own buffers
        mode = torch.inference_mode() if not hasattr(param, "full_tensor") else contextlib.nullcontext()
        with mode:
            out = [self._score(ids[i : i + n], param.device) for i in range(0, len(ids), n)]
            scores = torch.cat(out) if out else torch.zeros(0)
        return scores.clone()  # a normal tensor, made outside inference mode: the trainer computes with it

    def _score(self, rows, device) -> torch.Tensor:
        from fastppo.trainer.models import decoder_of, hidden_states

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                input_ids[i, width - len(r) :] = torch.as_tensor(r)
                mask[i, width - len(r) :] = True
        input_ids, mask = input_ids.to(device), mask.to(device)
        head = getattr(self.model, "score", None)
        if isinstance(head, torch.nn.Linear):  # last real token is the last column (left padding)
            hidden = hidden_states(decoder_of(self.model), input_ids, mask, keep=slice(-1, None))[:, 0]
            return head(hidden).squeeze(-1).float().cpu()
        from fastppo.trainer.models import position_ids

        logits = self.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids(mask)).logits
        return logits[:, 0].float().cpu()


class RunningMoments:
    """Running mean and variance of all scores seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        x = x.double()
        mean, m2 = x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RewardShaper:
    """Sequence scores -> shaped scores: ``s - missing_eos_penalty`` where a completion has no stop token,
    then ``(s - mean) / std`` over all scores so far (``normalize``), then ``clamp(s, -clip, clip)``."""

    def __init__(self, *, clip: float | None = None, missing_eos_penalty: float | None = None, normalize=False):
        self.clip = check_number("reward_clip", clip, gt=0, allow_none=True)
        self.missing_eos_penalty = check_number("missing_eos_penalty", missing_eos_penalty, allow_none=True)
        self.moments = RunningMoments() if normalize else None

    def __call__(self, scores: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        s = scores.float()
        if self.missing_eos_penalty is not None:
            s = torch.where(ended.to(s.device), s, s - self.missing_eos_penalty)
        if self.moments is not None:
            self.moments.update(s)
            s = (s - self.moments.mean) / (self.moments.std + 1e-8)
        if self.clip is not None:
            s = s.clamp(-self.clip, self.clip)
        return s

    def state_dict(self) -> dict:
        return {"moments": None if self.moments is None else self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.moments is not None and state.get("moments") is not None:
            self.moments.load_state_dict(state["moments"])
