"""Cases: rollout generation, ``fastppo.Generator`` (with and without CUDA graphs, and with the
decode step compiled) against Hugging Face ``generate`` eager (dynamic cache: TRL's rollout) and
with a static cache (which transformers compiles on CUDA).

Every variant samples at temperature 1 with top-k/top-p off and EOS disabled, so each row makes
exactly ``N`` new tokens after a left-padded prompt of ``P/2 .. P`` tokens. Rows:

* ``generate``: the whole call, prefill included; achieved = generated tokens per second;
* ``prefill``: the same call with ``max_new_tokens=1``; achieved = prompt tokens per second;
* ``decode_step`` (derived from the two, by the same timer): ``(generate - prefill) / (N - 1)``, put
  against the step's memory roofline: the bytes a step must read (every weight the step uses, once,
  and each row's valid keys and values) over the copy bandwidth measured in the same run, so its
  ``fraction_of_peak`` is the fraction of the roofline reached.

On CUDA: a Qwen2.5-0.5B-shaped random model in bf16, batches 1/8/64, ``P = 128``, ``N = 256``; on
the CPU: a tiny Qwen2 (fastppo.tiny), batches 1/8, no compilation (transformers compiles the static
cache only on CUDA, so that row is ``hf-static`` there).
"""

from __future__ import annotations

import importlib.metadata

import torch

import fastppo
from fastppo.bench.cases import BenchConfig, Case, Impl, Work
from fastppo.bench.timing import SLOW_CALL_TIMER

QWEN05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
SETUPS = {  # batches, longest prompt P, new tokens N, tiny-model options (CPU)
    "cuda": ((1, 8, 64), 128, 256, None),
    "cpu": ((1, 8), 32, 64, dict(vocab=512, hidden=128, layers=4, intermediate=256)),
    "quick": ((1, 8), 16, 16, dict(vocab=256, hidden=64, layers=2, intermediate=128)),
}
SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def make_model(device: str, tiny: dict | None):
    if tiny is not None:
        from fastppo.tiny import tiny_qwen2

        model = tiny_qwen2(**tiny, max_positions=1024).to(device)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(**QWEN05B)
        config._attn_implementation = fastppo.attention.choose_attn_implementation(device)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None  # fixed-length rollouts for every variant
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(batch: int, prompt: int, vocab: int, device: str, seed: int = 0):
    """Left-padded ``ids, mask [batch, prompt]`` with lengths in ``[prompt/2, prompt]``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt // 2, prompt + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g)
    mask = torch.arange(prompt)[None] >= (prompt - lengths)[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.long().to(device)


class _Rollout:
    """The model and the generators, built at first use and shared by every case of the run."""

    def __init__(self, cfg: BenchConfig, setup):
        self.cfg = cfg
        self.batches, self.prompt, self.new, self.tiny = setup
        self._model = None
        self._generators: dict = {}

    @property
    def model(self):
        if self._model is None:
            self._model = make_model(self.cfg.device, self.tiny)
        return self._model

    def generator(self, **options) -> fastppo.Generator:
        key = tuple(sorted(options.items()))
        if key not in self._generators:
            self._generators[key] = fastppo.Generator(
                self.model, max_batch_size=max(self.batches), max_length=self.prompt + self.new, **options
            )
        return self._generators[key]

    def step_bytes(self, mask: torch.Tensor) -> float:
        """Bytes one decode step must read: the weights it uses (the input embedding only for its rows)
        and each row's valid keys/values, at the mean cache length over the ``N`` steps."""
        from fastppo._generation_checks import inspect_model

        model = self.model
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if emb is not out:  # untied: the step reads one embedding row per sequence, not the table
            weights -= emb.numel() * emb.element_size()
        info = inspect_model(model, self.prompt + self.new)
        per_token = info.layers * 2 * info.kv_heads * info.head_dim * torch.finfo(info.dtype).bits // 8
        mean_len = float(mask.sum(-1).float().mean()) + self.new / 2
        return weights + mask.shape[0] * mean_len * per_token


def _impls(cfg: BenchConfig, roll: _Rollout) -> list[Impl]:
    def ours(**options):
        def fn(x):
            return (roll.generator(**options).generate(x["ids"], x["mask"], max_new_tokens=x["new"], **SAMPLING),)

        return fn

    def hf(static: bool):
        extra = dict(cache_implementation="static") if static else {}

        def fn(x):
            return (
                roll.model.generate(
                    input_ids=x["ids"], attention_mask=x["mask"], max_new_tokens=x["new"], **SAMPLING, **extra
                ),
            )

        return fn

    tf = f"transformers {importlib.metadata.version('transformers')}"
    cuda = cfg.needs(cuda=True)
    impls = [
        Impl("fastppo-graphs", ours(cuda_graphs=True), "fastppo.Generator, CUDA graphs", False, cuda),
        Impl(
            "fastppo-graphs+compile",
            ours(cuda_graphs=True, compile=True),
            "fastppo.Generator, decode step torch.compile-d then captured",
            False,
            cuda or cfg.needs(compile=True),
        ),
        Impl("fastppo-eager", ours(cuda_graphs=False), "fastppo.Generator, no CUDA graphs", False),
        Impl("hf-eager", hf(False), f"{tf} generate, dynamic cache (TRL 1.12.0 PPOTrainer's rollout)", True),
    ]
    if cfg.device == "cuda":
        impls.append(
            Impl(
                "hf-static-compile",
                hf(True),
                f"{tf} generate, static cache, auto-compiled",
                True,
                cfg.needs(compile=True),
            )
        )
    else:
        impls.append(Impl("hf-static", hf(True), f"{tf} generate, static cache (compiled only on CUDA)", True))
    return impls


def generate_cases(cfg: BenchConfig) -> list[Case]:
    setup = SETUPS["quick" if cfg.quick else cfg.device]
    roll = _Rollout(cfg, setup)
    impls = _impls(cfg, roll)
    dtype = "bfloat16" if setup[3] is None else "float32"
    cases = []
    for b in roll.batches:
        shape = f"B={b} P={roll.prompt} N={roll.new}"
        for op, new in (("generate", roll.new), ("prefill", 1)):

            def make(b=b, new=new):
                ids, mask = make_prompts(b, roll.prompt, roll.model.config.vocab_size, cfg.device)
                return {"ids": ids, "mask": mask, "new": new}

            def work(x, pass_, op=op):
                tokens = x["ids"].shape[0] * x["new"] if op == "generate" else float(x["mask"].sum())
                return Work(tokens, "tok/s", None)

            cases.append(
                Case(
                    op=op,
                    shape=shape,
                    dtype=dtype,
                    device=cfg.device,
                    make_inputs=make,
                    impls=impls,
                    work=work,
                    passes=("fwd",),
                    reference=None,
                    timer=SLOW_CALL_TIMER,
                    meta={"rollout": roll, "new": roll.new},
                )
            )
    return cases


def decode_step_rows(cases: list[Case], rows: list[dict], peaks: dict) -> list[dict]:
    """The ``decode_step`` rows: per implementation and shape, ``(generate - prefill) / (N - 1)``."""
    by_key = {(r["op"], r["impl"], r["shape"]): r for r in rows if r.get("time_ms") is not None}
    out = []
    for case in cases:
        if case.op != "generate":
            continue
        roll, new = case.meta["rollout"], case.meta["new"]
        step_bytes = roll.step_bytes(case.inputs()["mask"])
        for impl in case.impls:
            gen, pre = by_key.get(("generate", impl.name, case.shape)), by_key.get(("prefill", impl.name, case.shape))
            if gen is None or pre is None or new < 2:
                continue
            ms = max(gen["time_ms"] - pre["time_ms"], 0.0) / (new - 1)
            achieved = step_bytes / (ms * 1e-3) / 1e9 if ms > 0 else None
            row = dict(gen)
            row.update(
                op="decode_step",
                time_ms=ms,
                peak_mem_mb=None,
                achieved=achieved,
                unit="GB/s",
                peak="copy_gbs",
                fraction_of_peak=None if achieved is None else achieved / peaks["copy_gbs"],
                work=step_bytes,
                reps=min(gen["reps"], pre["reps"]),
                speedup={},
            )
            out.append(row)
    return out
