"""Benchmark: rollout generation, fastppo.Generator vs Hugging Face ``generate`` (as TRL rolls out).

    python bench/bench_generate.py                     # CUDA: Qwen2.5-0.5B-shaped random model, bf16
    python bench/bench_generate.py --device cpu        # a tiny model, ours vs HF eager (exercises the script)
    pytest bench/bench_generate.py --benchmark-enable  # the CUDA variants under pytest-benchmark

Variants (all sample at temperature 1 with top-k/top-p off, EOS disabled: exactly ``--new`` tokens per row,
ragged left-padded prompts of ``--prompt/2 .. --prompt`` tokens):

* ``fastppo``: our Generator (CUDA graphs on CUDA, the plain loop on CPU), attention chosen
  automatically (``flash_attn_with_kvcache`` with flash-attn, else SDPA);
* ``fastppo+compile``: the same with the decode step ``torch.compile``-d before capture (``--compile``);
* ``hf-eager``: ``model.generate`` with its default dynamic cache (TRL's rollout);
* ``hf-static-compile``: ``model.generate(cache_implementation="static")``, which transformers
  auto-compiles (``torch.compile`` mode ``reduce-overhead``) on CUDA.

Every variant is warmed up (graph capture / compilation) before timing; tokens/s counts the ``B * new``
generated tokens over the wall-clock of the whole ``generate`` call (prefill included). The decode step
is compared with the memory roofline: ``(weight bytes + KV-cache bytes a step must read) / bandwidth``,
the bandwidth measured in the same run as a device-to-device copy (read + write bytes / time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import fastppo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tests._tiny_models

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


# --- models and inputs ----------------------------------------------------------------------------
def make_model(device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if device == "cpu":
        from tests._tiny_models import tiny_qwen2

        model = tiny_qwen2(vocab=512, hidden=128, layers=4, intermediate=256)
    else:
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
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt // 2, prompt + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g)
    mask = torch.arange(prompt)[None] >= (prompt - lengths)[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.long().to(device)


# --- the variants ---------------------------------------------------------------------------------
SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def run_ours(gen, ids, mask, new):
    return gen.generate(ids, mask, max_new_tokens=new, pad_token_id=0, **SAMPLING)


def run_hf(model, ids, mask, new, static: bool):
    extra = dict(cache_implementation="static") if static else {}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, **SAMPLING, **extra)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    """Best wall-clock of ``reps`` calls (after the caller's warm-up) and that call's result."""
    best, out = float("inf"), None
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        result = fn()
        _sync(device)
        secs = time.perf_counter() - t
        if secs < best:
            best, out = secs, result
    return best, out


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs, _ = timed(lambda: dst.copy_(src), device, 20)
    return 2 * nbytes / secs


def roofline_step_seconds(model, gen, batch, mask, new, bandwidth) -> float:
    """Bytes a decode step must read: every weight once, plus each row's valid keys/values (mean over steps)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info = gen.info
    per_token = info.layers * 2 * info.kv_heads * info.head_dim * torch.finfo(info.dtype).bits // 8
    mean_len = float(mask.sum(-1).float().mean()) + new / 2
    return (weights + batch * mean_len * per_token) / bandwidth


# --- the table ------------------------------------------------------------------------------------
def run_table(device, batches, prompt, new, reps, variants):
    model = make_model(device)
    vocab = model.config.vocab_size
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    gen = fastppo.Generator(model, max_batch_size=max(batches), max_length=prompt + new)
    gen_c = None
    if "fastppo+compile" in variants:
        gen_c = fastppo.Generator(model, max_batch_size=max(batches), max_length=prompt + new, compile=True)
    print(
        f"# {device} {torch.cuda.get_device_name() if device == 'cuda' else ''} torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, model {type(model).__name__} "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params {next(model.parameters()).dtype}, "
        f"attention={gen.attention} prefill={gen.prefill} graphs={gen.cuda_graphs}; "
        f"prompt {prompt // 2}..{prompt}, new {new}"
    )
    if bandwidth:
        print(f"# measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(
        f"{'variant':<20}{'batch':>6}{'tok/s':>11}{'vs hf-eager':>13}{'warm-up s':>11}{'ms/step':>9}"
        f"{'roofline ms':>13}{'x roofline':>11}"
    )
    for batch in batches:
        ids, mask = make_prompts(batch, prompt, vocab, device)
        fns = {
            "fastppo": lambda ids=ids, mask=mask: run_ours(gen, ids, mask, new),
            "fastppo+compile": lambda ids=ids, mask=mask: run_ours(gen_c, ids, mask, new),
            "hf-eager": lambda ids=ids, mask=mask: run_hf(model, ids, mask, new, static=False),
            "hf-static-compile": lambda ids=ids, mask=mask: run_hf(model, ids, mask, new, static=True),
        }
        base = None
        for name in variants:
            if name == "hf-static-compile" and device != "cuda":
                continue
            _sync(device)
            t = time.perf_counter()
            fns[name]()  # warm-up: graph capture / compilation
            _sync(device)
            warm = time.perf_counter() - t
            secs, out = timed(fns[name], device, reps)
            tps = batch * new / secs
            base = tps if name == "hf-eager" else base
            step_ms = roof_ms = ratio = float("nan")
            if name.startswith("fastppo"):
                step_ms = 1e3 * out.decode_seconds / max(out.decode_steps, 1)
                if bandwidth:
                    roof_ms = 1e3 * roofline_step_seconds(model, gen, batch, mask, new, bandwidth)
                    ratio = step_ms / roof_ms
            else:
                step_ms = 1e3 * secs / new  # prefill included
            speed = f"{tps / base:.2f}x" if base else "-"
            print(
                f"{name:<20}{batch:>6}{tps:>11.0f}{speed:>13}{warm:>11.1f}{step_ms:>9.3f}{roof_ms:>13.3f}{ratio:>11.2f}"
            )


# --- pytest-benchmark -----------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    _PROMPT, _NEW = 128, 256

    @pytest.fixture(scope="module")
    def setup():
        model = make_model("cuda")
        return model, fastppo.Generator(model, max_batch_size=64, max_length=_PROMPT + _NEW)

    @_cuda
    @pytest.mark.parametrize("batch", [1, 8, 64])
    @pytest.mark.parametrize("name", ["fastppo", "hf-eager", "hf-static-compile"])
    def test_generate(benchmark, setup, name, batch):
        model, gen = setup
        ids, mask = make_prompts(batch, _PROMPT, model.config.vocab_size, "cuda")
        fn = {
            "fastppo": lambda: run_ours(gen, ids, mask, _NEW),
            "hf-eager": lambda: run_hf(model, ids, mask, _NEW, static=False),
            "hf-static-compile": lambda: run_hf(model, ids, mask, _NEW, static=True),
        }[name]
        fn()  # warm-up
        benchmark.pedantic(lambda: (fn(), _sync("cuda")), rounds=3, iterations=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt", type=int, default=None, help="longest prompt (shortest is half)")
    p.add_argument("--new", type=int, default=None, help="new tokens per row")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time fastppo with compile=True")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    variants = ["hf-eager", "fastppo"] + (["fastppo+compile"] if a.compile else []) + ["hf-static-compile"]
    variants = [v for v in variants if v not in a.skip]
    if device == "cuda":
        run_table(device, a.batches or [1, 8, 64], a.prompt or 128, a.new or 256, a.reps or 3, variants)
    else:
        run_table(device, a.batches or [1, 8], a.prompt or 16, a.new or 32, a.reps or 2, variants)


if __name__ == "__main__":
    main()
