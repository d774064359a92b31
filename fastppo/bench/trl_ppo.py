"""TRL 1.12.0's ``PPOTrainer`` (``trl.experimental.ppo``, the last release with PPO), one step at a time.

TRL's PPO step is one iteration of the ``for update in ...`` loop inside ``PPOTrainer.train()``: there
is no step method to call. :class:`TRLStepper` runs ``train()`` unchanged in a worker thread and
parks it in a ``TrainerCallback.on_step_end`` (the last thing each iteration does before the loop's
tail); :meth:`TRLStepper.step` lets it run until it parks again, so one call runs exactly one full
iteration as TRL ships it: the tail of the previous iteration after its callback (its second
``gc.collect()``, the ``del``s, ``empty_cache``) and then the next iteration up to its callback
(``next(dataloader)``, generation, the scoring, reference and value forwards, the first
``gc.collect()``, GAE, the PPO epochs, the metrics and ``self.log``, ``lr_scheduler.step()``). The
calling thread waits meanwhile, so nothing runs beside it; the worker runs on as many torch threads as
the caller (set in the worker: OpenMP's thread count is per thread). The first step also runs
``train()``'s set-up (benchmarks discard it as warm-up).

Phases, timed by wrapping the module globals of ``trl.experimental.ppo.ppo_trainer`` that ``train()``
calls (and restoring them when it returns), with nothing else changed:

* ``generation``: ``batch_generation`` (HF ``generate`` on the policy, with ``output_scores``);
* ``scoring``: ``get_reward(reward_model, ...)``;
* ``gc``: the two ``gc.collect()`` calls of ``train()``;
* ``update``: from the first ``forward`` with gradients on (the first PPO micro-batch) to the first
  ``accelerator.gather_for_metrics`` (the metrics that follow the PPO epochs);
* ``other``: from there to the callback (metrics, ``self.log``, ``lr_scheduler.step()``);
* ``prepare``: the rest: the log-probs of the generation's logits, the reference forward
  (``forward(ref_policy, ...)``), the value forward (``get_reward(value_model, ...)``), response
  processing and GAE, and the loop's bookkeeping (the previous step's tail, ``next(dataloader)``).

**No gc**: ``train()`` looks up ``gc`` in its module's globals; that name is replaced by
:class:`_GC`, whose ``collect()`` calls the real ``gc.collect()`` (timed) unless
:attr:`TRLStepper.collect` is False, when it returns 0 without collecting. Only TRL's two explicit
calls are removed: Python's automatic (generational) collection keeps running as usual.

Compatibility with transformers 5.24: none needed. TRL 1.12.0's PPO runs as it is (transformers warns
that ``generation_config`` comes with ``output_scores``/``return_dict_in_generate``; that is TRL's own
call).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import threading
import time

import torch

TRL_VERSION = "1.12.0"
SOURCE = f"TRL {TRL_VERSION} trl/experimental/ppo/ppo_trainer.py PPOTrainer.train, one loop iteration"


def unavailable() -> str | None:
    """Why TRL's PPOTrainer cannot run here (None: it can)."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return f"trl not installed (pip install trl=={TRL_VERSION})"
    if version != TRL_VERSION:
        return f"trl {version} installed; the PPO baseline is trl=={TRL_VERSION} (the last release with PPOTrainer)"
    for module in ("accelerate", "datasets"):
        try:
            importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            return f"{module} not installed (trl's PPOTrainer needs it)"
    return None


class _Stopped(Exception):
    """Raised from the callback to unwind ``train()`` when the stepper closes."""


class _GC:
    """Stands in for the ``gc`` module inside TRL's ppo_trainer module (see the module docstring)."""

    def __init__(self, stepper: TRLStepper):
        self._stepper = stepper

    def collect(self, *args, **kwargs) -> int:
        if not self._stepper.collect:
            return 0
        with self._stepper._timed("gc"):
            return gc.collect(*args, **kwargs)


class TRLStepper:
    """Runs a built ``trl.experimental.ppo.PPOTrainer`` one ``train()`` iteration per :meth:`step`.

    The trainer's ``args.total_episodes`` must allow as many iterations as will be stepped (the loop
    ends after ``num_total_batches``). :meth:`close` unwinds ``train()``.
    """

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.trainer = trainer
        self.collect = True
        """Whether TRL's two ``gc.collect()`` calls collect in the next steps."""
        self.threads = torch.get_num_threads()
        self._go, self._parked = threading.Semaphore(0), threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._rec: dict = {}
        self._finished = False
        stepper = self

        class _Park(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stepper._rec["end"] = time.perf_counter()
                stepper._parked.release()
                stepper._go.acquire()
                if stepper._closing:
                    raise _Stopped

        trainer.add_callback(_Park())

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._rec[name] = self._rec.get(name, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def _instrumented(self):
        """Wrap the module globals ``train()`` calls (module docstring); restore them afterwards."""
        from trl.experimental.ppo import ppo_trainer as m

        trainer = self.trainer
        saved = {name: getattr(m, name) for name in ("batch_generation", "get_reward", "forward", "gc")}
        accelerator = trainer.accelerator
        gather = accelerator.gather_for_metrics

        def batch_generation(*args, **kwargs):
            with self._timed("generation"):
                return saved["batch_generation"](*args, **kwargs)

        def get_reward(model, *args, **kwargs):
            with self._timed("scoring" if model is trainer.reward_model else "values"):
                return saved["get_reward"](model, *args, **kwargs)

        def forward(model, *args, **kwargs):
            if torch.is_grad_enabled():
                self._rec.setdefault("update_start", time.perf_counter())
                return saved["forward"](model, *args, **kwargs)
            with self._timed("ref"):
                return saved["forward"](model, *args, **kwargs)

        def gather_for_metrics(*args, **kwargs):
            self._rec.setdefault("update_end", time.perf_counter())
            return gather(*args, **kwargs)

        m.batch_generation, m.get_reward, m.forward, m.gc = batch_generation, get_reward, forward, _GC(self)
        accelerator.gather_for_metrics = gather_for_metrics
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(m, name, value)
            del accelerator.gather_for_metrics  # the bound method of the class again

    def _main(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            with self._instrumented():
                self.trainer.train()
        except _Stopped:
            pass
        except BaseException as e:  # handed to the caller of step()
            self._error = e
        finally:
            self._finished = True
            self._parked.release()

    # ------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """Run one iteration of TRL's loop; returns its seconds: ``step`` and the phases of the module
        docstring (``generation``, ``scoring``, ``prepare``, ``update``, ``gc``, ``other``; ``ref`` and
        ``values`` are parts of ``prepare``)."""
        if self._finished:
            raise RuntimeError("TRL's train() loop has ended (raise the trainer's total_episodes)")
        self._rec = {"start": time.perf_counter()}
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="trl-ppo-train", daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._parked.acquire()
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("TRL's train() loop ended before the step did (raise total_episodes)")
        return self._phases(self._rec)

    @staticmethod
    def _phases(rec: dict) -> dict:
        total = rec["end"] - rec["start"]
        start, end = rec.get("update_start"), rec.get("update_end")
        update = end - start if start is not None and end is not None else 0.0
        other = rec["end"] - end if end is not None else 0.0
        out = {k: rec.get(k, 0.0) for k in ("generation", "scoring", "gc", "ref", "values")}
        out.update(step=total, update=update, other=other)
        out["prepare"] = total - out["generation"] - out["scoring"] - out["gc"] - update - other
        return out

    def close(self) -> None:
        """Unwind ``train()`` (its callback raises) and wait for the worker."""
        if self._thread is None or self._finished:
            return
        self._closing = True
        self._go.release()
        self._thread.join()


def build_trainer(
    *,
    policy,
    ref_policy,
    reward_model,
    value_model,
    tokenizer,
    prompt_ids: list,
    new_tokens: int,
    steps: int,
    learning_rate: float,
    kl_coef: float,
    temperature: float,
    bf16: bool,
    output_dir: str,
    seed: int = 0,
):
    """TRL's PPOTrainer on one rollout batch of ``len(prompt_ids)`` prompts (token id lists) per step:
    1 PPO epoch, 1 mini-batch, no gradient accumulation, every rollout forward in one batch, exactly
    ``new_tokens`` new tokens (no stop token), no evaluation, sample generations or saving."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "you are importing from trl.experimental"
        from datasets import Dataset
        from trl.experimental.ppo import PPOConfig, PPOTrainer

    batch = len(prompt_ids)
    args = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=batch,
        total_episodes=batch * steps,
        response_length=new_tokens,
        stop_token=None,
        stop_token_id=None,
        temperature=temperature,
        learning_rate=learning_rate,
        kl_coef=kl_coef,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,  # TRL's config defaults to True (PPOTrainer does not apply it); ours is off
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=seed,
    )
    data = Dataset.from_dict({"input_ids": [list(map(int, p)) for p in prompt_ids]})
    return PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=data,
        value_model=value_model,
    )
