"""Case: the end-to-end PPO step of our trainer (``fastppo.PPOTrainer.step()``) against TRL 1.12.0's
``PPOTrainer`` (one iteration of its ``train()`` loop: :mod:`fastppo.bench.trl_ppo`), on the same
models, prompts and lengths.

Both sides get the same: policy (a random ``LlamaForCausalLM`` built from a config with a fixed seed),
reference (a copy of the policy), reward model (a ``LlamaForSequenceClassification``, one label, another
seed), value model (a copy of the reward model: its body and score head), the same prompts (token ids:
a char-level tokenizer built here has one character per id, so text and ids round-trip exactly), exactly
``N`` new tokens per completion (TRL: no stop token, ``response_length=N``; fastppo: ``ignore_eos``),
the old policy's log-probs from the rollout (TRL takes them from its generation logits; fastppo:
``reuse_rollout_logprobs``, the Generator's: neither runs an old-policy forward), temperature 1,
learning rate, KL coefficient 0.05 (k1, in the reward), value coefficient 0.1, value clip 0.2, AdamW
weight decay (TRL's: transformers' default), no gradient clipping (TRL's loop has none),
1 PPO epoch of 1 mini-batch without gradient accumulation, every rollout forward in one batch, no
evaluation or saving. CPU: fp32 throughout (TRL ``bf16=False``); CUDA: fp32 weights with bf16
autocast on both sides (TRL's default ``bf16=True``; TRL autocasts only its training forward).

Timing: the trainers are built, then every implementation runs ``warmup`` steps, then ``rounds``
rounds in which each runs one step, in an order that rotates every round, so that the load of a
shared machine falls on all of them alike. ``trl-1.12.0`` and ``trl-1.12.0-no-gc`` are the same TRL
trainer stepped with and without its two ``gc.collect()`` calls per step (:mod:`fastppo.bench.trl_ppo`
says exactly how they are removed). A row's ``time_ms`` is the median over its rounds of the whole
step (fastppo: the ``step()`` call; TRL: a loop iteration); ``achieved`` is generated tokens
(``B x N``) per second. ``phases_ms`` holds the median of each phase: ``generation``, ``scoring``
(reward model), ``prepare`` (old log-probs, reference, values, advantages), ``update`` (the PPO
epochs), ``gc`` (TRL's ``gc.collect()``), ``other`` (the rest: metrics, logging); the rows
``ppo_step:<phase>`` give the four main ones as rows of their own (achieved: tokens per second of
that phase). ``load_avg`` is the 1-minute load average before and after the rounds, ``gc_objects``
the number of objects Python's collector tracked before them (what a ``gc.collect()`` walks).

Shapes: CPU: the tiny Llama (hidden 64, 2 layers, vocab 256), 16 prompts of 8..16 tokens, 32 new
tokens; CUDA: a Qwen2.5-0.5B-shaped random Qwen2, 64 prompts of 64..128 tokens, 256 new tokens;
``--quick``: the tiny Llama, 4 prompts, 8 new tokens.

The steps are timed by this module, interleaved, not by the runner's per-implementation timer: the
case hands the runner no implementation to time, and :func:`ppo_step_rows` (the op's row derivation)
returns the rows; ``--impls`` and ``--list`` do not apply to it. TRL's rows are skipped, with the
reason, where ``trl==1.12.0`` (with accelerate and datasets) is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.metadata
import io
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from fastppo.bench import trl_ppo
from fastppo.bench.cases import BenchConfig, Case, Impl
from fastppo.bench.ops_generate import QWEN05B

OP = "ppo_step"
PASS = "step"
PHASES = ("generation", "scoring", "prepare", "update")
ALL_PHASES = (*PHASES, "gc", "other")
FASTPPO, TRL, TRL_NO_GC = "fastppo", f"trl-{trl_ppo.TRL_VERSION}", f"trl-{trl_ppo.TRL_VERSION}-no-gc"

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
LEARNING_RATE, KL_COEF, VF_COEF, VF_CLIP, TEMPERATURE = 1e-6, 0.05, 0.1, 0.2, 1.0
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


@dataclass(frozen=True)
class Setup:
    """One shape of the case."""

    arch: str
    """``"llama"`` (tiny) or ``"qwen2"`` (Qwen2.5-0.5B-shaped)."""
    model: dict
    """The model config's sizes."""
    prompts: int
    """Prompts per step (one completion each)."""
    prompt_len: tuple[int, int]
    """Shortest and longest prompt, in tokens."""
    new: int
    """New tokens per completion."""
    warmup: int
    """Untimed steps of each implementation first."""
    rounds: int
    """Timed rounds (one step of each implementation per round)."""

    @property
    def shape(self) -> str:
        return f"B={self.prompts} P={self.prompt_len[1]} N={self.new}"


SETUPS = {
    "cuda": Setup("qwen2", QWEN05B, 64, (64, 128), 256, warmup=2, rounds=5),
    "cpu": Setup("llama", TINY, 16, (8, 16), 32, warmup=3, rounds=21),
    "quick": Setup("llama", TINY, 4, (4, 8), 8, warmup=1, rounds=3),
}


def setup_of(cfg: BenchConfig) -> Setup:
    return SETUPS["quick" if cfg.quick else cfg.device]


# ------------------------------------------------------------------------------------------ models, data
def char_tokenizer(vocab: int):
    """A ``PreTrainedTokenizerFast`` of ``vocab`` ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
    then one character per id (code points from U+0100, surrogates skipped), left padding, no special
    tokens added: every id the models can sample decodes to text that tokenizes back to it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    points = (c for c in range(0x100, 0x110000) if not 0xD800 <= c < 0xE000)
    chars = [chr(c) for _, c in zip(range(vocab - len(specials)), points)]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left",
    )  # fmt: skip


def _config(s: Setup, **extra):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if s.arch == "llama" else Qwen2Config
    init = dict(initializer_range=0.2) if s.arch == "llama" else {}  # tiny: logits far from uniform
    config = cls(**s.model, **init, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **extra)
    config._attn_implementation = "sdpa"
    return config


def make_models(s: Setup, device: str) -> dict:
    """Fresh ``policy``, ``ref`` (its copy), ``reward`` and ``value`` (its copy) models: the same weights
    at every call (seeds 0 and 1), float32, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(_config(s), dtype=torch.float32).to(device).eval()
    policy.generation_config.pad_token_id = PAD_ID
    policy.generation_config.eos_token_id = None  # fixed-length rollouts on both sides
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_config(_config(s, num_labels=1), dtype=torch.float32)
    reward = reward.to(device).eval()
    return dict(policy=policy, ref=copy.deepcopy(policy), reward=reward, value=copy.deepcopy(reward))


def make_prompts(s: Setup, seed: int = 0) -> list[list[int]]:
    """``s.prompts`` token id lists of ``s.prompt_len`` lengths, ids avoiding the special tokens."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = s.prompt_len
    lengths = torch.randint(lo, hi + 1, (s.prompts,), generator=g)
    lengths[-1] = hi
    return [torch.randint(4, s.model["vocab_size"], (int(n),), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------- fastppo
class FastppoStepper:
    """``fastppo.PPOTrainer`` on the case's models; :meth:`step` runs one ``trainer.step()``."""

    def __init__(self, s: Setup, device: str, tokenizer, prompts: list[list[int]], *, weight_decay: float):
        from fastppo.trainer import PPOConfig, PPOTrainer

        self.folder = tempfile.TemporaryDirectory(prefix="fastppo-bench-")
        texts = tokenizer.batch_decode(prompts)
        if tokenizer(texts, add_special_tokens=True)["input_ids"] != prompts:  # the tokenizer's contract
            raise AssertionError("the benchmark tokenizer does not round-trip the prompts")
        config = PPOConfig.from_dict(
            dict(
                device=device, rollout_batch_size=len(prompts), samples_per_prompt=1, max_new_tokens=s.new,
                temperature=TEMPERATURE, ignore_eos=True, reuse_rollout_logprobs=True, ppo_epochs=1, num_minibatches=1,
                learning_rate=LEARNING_RATE, critic_learning_rate=LEARNING_RATE, weight_decay=weight_decay,
                max_grad_norm=None, kl_coef=KL_COEF, vf_coef=VF_COEF, vf_clip=VF_CLIP, critic_init="reward",
                max_steps=1_000_000, eval_every=0, save_every=0, save_final=False, progress_bar=False,
                handle_signals=False, output_dir=self.folder.name, seed=0,
            )
        )  # fmt: skip
        m = make_models(s, device)
        self.trainer = PPOTrainer(config, m["policy"], tokenizer, m["reward"], ref_model=m["ref"], train_prompts=texts)
        if self.trainer.train_data.ids != prompts:
            raise AssertionError("fastppo's trainer tokenized the prompts differently")
        # critic_init="reward": the critic is a copy of the reward model's body and score head, as TRL's
        # value model here (m["value"], a copy of the reward model, is not needed)

    def step(self) -> dict:
        t0 = time.perf_counter()
        metrics = self.trainer.step()
        total = time.perf_counter() - t0
        out = dict(
            generation=metrics["time_rollout_s"],
            scoring=metrics["time_score_s"],
            prepare=metrics["time_prepare_s"],
            update=metrics["time_train_s"],
            gc=0.0,
            step=total,
        )
        out["other"] = total - sum(out[p] for p in PHASES)  # the step's metrics, bookkeeping
        return out

    def close(self) -> None:
        self.folder.cleanup()


# -------------------------------------------------------------------------------------------------- TRL
class TRLSteppers:
    """TRL's trainer on the case's models, and the two ways of stepping it (with and without gc)."""

    def __init__(self, s: Setup, device: str, tokenizer, prompts: list[list[int]], steps: int):
        self.folder = tempfile.TemporaryDirectory(prefix="trl-bench-")
        m = make_models(s, device)
        trainer = trl_ppo.build_trainer(
            policy=m["policy"], ref_policy=m["ref"], reward_model=m["reward"], value_model=m["value"],
            tokenizer=tokenizer, prompt_ids=prompts, new_tokens=s.new, steps=steps, learning_rate=LEARNING_RATE,
            kl_coef=KL_COEF, temperature=TEMPERATURE, bf16=device == "cuda", output_dir=self.folder.name,
        )  # fmt: skip
        trainer.args.vf_coef, trainer.args.cliprange_value = VF_COEF, VF_CLIP  # its defaults: spelled out
        self.weight_decay = trainer.args.weight_decay
        self.stepper = trl_ppo.TRLStepper(trainer)

    def step(self, collect: bool) -> dict:
        self.stepper.collect = collect
        return self.stepper.step()

    def close(self) -> None:
        self.stepper.close()
        self.folder.cleanup()


# ------------------------------------------------------------------------------------------- the session
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


STEPS = 1_000_000  # TRL's loop length (total_episodes / batch): more than any benchmark steps; nothing is sized by it


@contextlib.contextmanager
def steppers(s: Setup, device: str, *, trl: bool = True):
    """``{impl name: step()}`` on freshly built trainers (TRL's only with ``trl`` and where it is
    installed); each ``step()`` runs one PPO step, synchronized, and returns its seconds (``step`` and
    the phases). TRL's log lines (it prints them every step) go to a sink meanwhile."""
    tokenizer = char_tokenizer(s.model["vocab_size"])
    prompts = make_prompts(s)
    theirs = TRLSteppers(s, device, tokenizer, prompts, STEPS) if trl and trl_ppo.unavailable() is None else None
    ours = None
    try:
        ours = FastppoStepper(s, device, tokenizer, prompts, weight_decay=theirs.weight_decay if theirs else 0.0)

        def synced(fn):
            def step():
                out = fn()
                _sync(device)
                return out

            return step

        steps = {FASTPPO: synced(ours.step)}
        if theirs is not None:
            steps[TRL] = synced(lambda: theirs.step(collect=True))
            steps[TRL_NO_GC] = synced(lambda: theirs.step(collect=False))
        with contextlib.redirect_stdout(io.StringIO()), torch.enable_grad():
            yield steps
    finally:
        if ours is not None:
            ours.close()
        if theirs is not None:
            theirs.close()


class Session:
    """The implementations of one case and their interleaved measurement (module docstring), run once."""

    def __init__(self, cfg: BenchConfig, s: Setup):
        self.cfg, self.setup = cfg, s
        self.trl_skip = trl_ppo.unavailable()
        self.results: dict | None = None

    def impls(self) -> list[Impl]:
        tf = f"transformers {importlib.metadata.version('transformers')}"
        if self.trl_skip is None:
            tf += "".join(f", {m} {importlib.metadata.version(m)}" for m in ("accelerate", "datasets"))
        source = "fastppo.PPOTrainer.step (fastppo/trainer/trainer.py), reuse_rollout_logprobs=True (as TRL)"
        ours = Impl(FASTPPO, _no_fn, source, False, passes=(PASS,))
        trl = [
            Impl(TRL, _no_fn, f"{trl_ppo.SOURCE}, {tf}", True, self.trl_skip, passes=(PASS,)),
            Impl(TRL_NO_GC, _no_fn, f"{trl_ppo.SOURCE} without its 2 gc.collect() calls, {tf}", True,
                 self.trl_skip, passes=(PASS,)),
        ]  # fmt: skip
        return [ours, *trl]

    def measure(self) -> dict:
        """``steps``: ``{impl: [the seconds of each timed step]}``; ``load_avg``: the 1-minute load average
        before and after the rounds; ``gc_objects``: objects the collector tracked before them. Measured once."""
        if self.results is not None:
            return self.results
        s = self.setup
        with steppers(s, self.cfg.device, trl=self.trl_skip is None) as steps:
            names = list(steps)
            for _ in range(s.warmup):
                for name in names:
                    steps[name]()
            out: dict = {name: [] for name in names}
            load_before, objects = os.getloadavg()[0], len(gc.get_objects())
            for r in range(s.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates
                    out[name].append(steps[name]())
            load_after = os.getloadavg()[0]
        self.results = {"steps": out, "load_avg": [round(load_before, 2), round(load_after, 2)], "gc_objects": objects}
        return self.results


def _no_fn(inputs):  # the steps are not timed through Case.call (module docstring)
    raise NotImplementedError("ppo_step is timed by fastppo.bench.ops_e2e.Session, not through Case.call")


def ppo_step_cases(cfg: BenchConfig) -> list[Case]:
    s = setup_of(cfg)
    session = Session(cfg, s)
    return [
        Case(
            op=OP,
            shape=s.shape,
            dtype="float32" if cfg.device != "cuda" else "float32+bf16-autocast",
            device=cfg.device,
            make_inputs=dict,
            impls=[],  # timed by the session, interleaved: see ppo_step_rows
            work=lambda x, p: None,
            passes=(PASS,),
            reference=None,
            meta={"session": session, "setup": s, "impls": session.impls()},
        )
    ]


def _median_phases(steps: list[dict]) -> dict:
    return {k: statistics.median(st[k] for st in steps) for k in ("step", *ALL_PHASES)}


def ppo_step_rows(cases: list[Case], rows: list[dict], peaks: dict) -> list[dict]:
    """The rows of the op: per implementation, the whole step and its four main phases."""
    from fastppo.bench.runner import _row, _why

    out = []
    for case in cases:
        s, session, impls = case.meta["setup"], case.meta["session"], case.meta["impls"]
        tokens = s.prompts * s.new
        try:
            results = session.measure()
        except Exception as e:  # reported in the rows, as a failing implementation is
            why = _why(e)
            out += [_row(case, i, PASS, **({"skipped": i.skip} if i.skip else {"error": why})) for i in impls]
            continue
        for impl in impls:
            if impl.skip is not None:
                out.append(_row(case, impl, PASS, skipped=impl.skip))
                out += [_row(_phase_case(case, p), impl, PASS, skipped=impl.skip) for p in PHASES]
                continue
            steps = results["steps"][impl.name]
            med = _median_phases(steps)
            figures = dict(reps=len(steps), work=tokens, unit="tok/s", peak=None)
            out.append(
                _row(
                    case,
                    impl,
                    PASS,
                    time_ms=1e3 * med["step"],
                    achieved=tokens / med["step"],
                    phases_ms={k: 1e3 * med[k] for k in ALL_PHASES},
                    load_avg=results["load_avg"],
                    gc_objects=results["gc_objects"],
                    **figures,
                )
            )
            for p in PHASES:
                if med[p] > 0:
                    out.append(
                        _row(
                            _phase_case(case, p), impl, PASS, time_ms=1e3 * med[p], achieved=tokens / med[p], **figures
                        )
                    )
    return out


def _phase_case(case: Case, phase: str) -> Case:
    return Case(op=f"{OP}:{phase}", shape=case.shape, dtype=case.dtype, device=case.device,
                make_inputs=dict, impls=[], work=case.work, passes=case.passes, reference=None)  # fmt: skip
