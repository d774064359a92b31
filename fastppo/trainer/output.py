"""What a run writes: the output folder's files, the console (progress bar or metric lines), TensorBoard.

``output_dir/``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one object per step, keys as
:data:`fastppo.trainer.metrics.METRICS`), ``eval.jsonl`` (one object per evaluation: ``step``,
``eval_reward_mean``, ...), ``samples.jsonl`` (every evaluated completion: ``step``, ``prompt``,
``completion``, ``reward``), ``checkpoint-<step>/`` (:mod:`fastppo.trainer.checkpoint`), ``final/``
(the policy, ``save_pretrained``).

A run resumed at step ``s`` first cuts the three ``.jsonl`` files back to their records of steps ``<= s``
(those a killed run wrote after its checkpoint go), then appends: the files of a resumed run are those of
the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

_COLUMNS = [  # console: (metric, header, format)
    ("step", "step", "{:>5d}"),
    ("score_mean", "score", "{:>8.4f}"),
    ("reward_mean", "reward", "{:>8.4f}"),
    ("kl", "kl", "{:>8.4f}"),
    ("entropy", "entropy", "{:>7.3f}"),
    ("policy_loss", "pg_loss", "{:>8.4f}"),
    ("value_loss", "v_loss", "{:>8.4f}"),
    ("clip_frac", "clipfrac", "{:>8.3f}"),
    ("approx_kl", "approx_kl", "{:>9.5f}"),
    ("response_length_mean", "len", "{:>6.1f}"),
    ("tokens_per_s", "tok/s", "{:>7.0f}"),
    ("time_step_s", "sec", "{:>6.2f}"),
]


def _json(obj) -> str:
    # NaN/inf are not JSON: null instead (json.dumps would write the non-standard NaN token)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    return json.dumps(clean)


class RunOutput:
    """Opens the files of a run and shows progress. ``start_step > 0`` (a resumed run): the files are cut
    back to that step, then appended to; ``last_eval_step`` is the step of the last evaluation kept (None: none)."""

    def __init__(self, run, config, *, start_step: int = 0):
        self.dir = pathlib.Path(run.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(self.dir / "config.yaml")
        names = ("metrics", "eval", "samples")
        self.last_eval_step = None
        if start_step:
            kept = {n: truncate_jsonl(self.dir / f"{n}.jsonl", start_step) for n in names}
            self.last_eval_step = kept["eval"][-1]["step"] if kept["eval"] else None
        # open for the whole run (closed by close()): a line is flushed per record
        mode = "a" if start_step else "w"
        self.files = {n: open(self.dir / f"{n}.jsonl", mode) for n in names}  # noqa: SIM115
        self.log_every = run.log_every
        self.bar = None
        if run.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.max_steps, initial=start_step, desc="fastppo", unit="step", dynamic_ncols=True)
        self.tb = None
        if run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from e
            # purge_step: a resumed run drops the events a killed run logged after its checkpoint
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._header_shown = False

    def message(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def step(self, metrics: dict) -> None:
        self._write("metrics", metrics)
        step = metrics["step"]
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                kl=f"{metrics['kl']:.4f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
            )
        elif step % self.log_every == 0:
            if not self._header_shown:
                print(" ".join(f"{h:>{len(f.format(0 if 'd' in f else 0.0))}}" for _, h, f in _COLUMNS))
                self._header_shown = True
            print(" ".join(_cell(f, metrics.get(k)) for k, _, f in _COLUMNS))

    def evaluation(self, record: dict, samples: list) -> None:
        self._write("eval", record)
        for s in samples:
            self._write("samples", s)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step" and isinstance(v, float))
        self.message(f"eval @ step {record['step']}: {shown}")

    def _write(self, name: str, obj: dict) -> None:
        f = self.files[name]
        f.write(_json(obj) + "\n")
        f.flush()

    def sync(self) -> None:
        """Flush the files to the disk (before a checkpoint: the files never hold fewer steps than it)."""
        for f in self.files.values():
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


class NullOutput:
    """What ranks other than 0 have instead of a :class:`RunOutput` under torchrun: they write nothing."""

    last_eval_step = None

    def message(self, text: str) -> None:
        pass

    def step(self, metrics: dict) -> None:
        pass

    def evaluation(self, record: dict, samples: list) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_jsonl(path: pathlib.Path, step: int) -> list[dict]:
    """Keep the records of ``path`` whose ``step`` is at most ``step`` (a line cut off by a kill goes too),
    rewriting it atomically; returns them."""
    if not path.exists():
        return []
    kept, lines = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(record)
            lines.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return kept


def _cell(fmt: str, value) -> str:
    width = len(fmt.format(0 if "d" in fmt else 0.0))
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return fmt.format(int(value) if "d" in fmt else float(value))
