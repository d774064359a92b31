"""Benchmark: per-token log-probs + entropy from the last hidden states, fused vs the usual ways.

    python bench/bench_linear_logprobs.py                      # CUDA: N=8192, V=151936, bf16, H=896 and 4096
    python bench/bench_linear_logprobs.py --H 896 --reps 5     # one hidden size
    pytest bench/bench_linear_logprobs.py --benchmark-enable   # the same variants under pytest-benchmark

Variants, each forward + backward of ``hidden [N, H] @ weight[V, H].T`` -> per-token log-prob (and
entropy where said), gradients to hidden and weight:

* ``fastppo-triton``: our fused kernels (``fastppo.linear_logprobs_and_entropy``, Triton backend),
  log-prob + entropy; ``fastppo-triton-noent``: ``entropy=False``;
* ``fastppo-torch``: our chunked PyTorch reference (log-prob + entropy);
* ``naive``: ``hidden @ weight.T``, ``log_softmax`` in float32, gather, and entropy
  ``-sum p log p`` (how TRL/OpenRLHF/verl write it without a fused head);
* ``torch.compile``: the naive function, compiled;
* ``liger``: Liger-Kernel's fused linear cross-entropy, ``cce``: Apple's Cut Cross-Entropy
  (log-prob only, as a summed loss; CCE with its default gradient filtering), when importable.

Reported: median fwd+bwd time, TFLOP/s counting 8·N·H·V flops (forward 2, backward 6), that as a %
of the device's bf16 matmul throughput measured in the same run (a large ``torch.matmul``), and the
peak extra memory: ``max_memory_allocated`` during the step minus what was allocated before it,
less the gradients of hidden and weight (outputs every variant must produce), as a fraction of one
materialized bf16 ``[N, V]`` logits tensor. The goals: <= 5% and >= 70%.
"""

from __future__ import annotations

import argparse
import time

import torch

import fastppo

# --- the variants: fn(hidden, weight, labels) -> scalar to backpropagate ---------------------------


def fastppo_triton(h, w, y, entropy=True):
    with fastppo.use_backend("triton"):
        lp, ent = fastppo.linear_logprobs_and_entropy(h, w, y, entropy=entropy)
    return lp.sum() if ent is None else lp.sum() + ent.sum()


def fastppo_torch(h, w, y):
    with fastppo.use_backend("torch"):
        lp, ent = fastppo.linear_logprobs_and_entropy(h, w, y)
    return lp.sum() + ent.sum()


def naive(h, w, y):
    logits = h @ w.T
    lsm = torch.log_softmax(logits.float(), dim=-1)
    lp = lsm.gather(-1, y[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp.sum() + ent.sum()


_compiled = None


def compiled_naive(h, w, y):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive)
    return _compiled(h, w, y)


def liger(h, w, y):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(h, w, y, reduction="sum")


def cce(h, w, y):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, y, reduction="sum")


VARIANTS = {
    "fastppo-triton": fastppo_triton,
    "fastppo-triton-noent": lambda h, w, y: fastppo_triton(h, w, y, entropy=False),
    "fastppo-torch": fastppo_torch,
    "naive": naive,
    "torch.compile": compiled_naive,
    "liger": liger,
    "cce": cce,
}
_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def available(name: str) -> str | None:
    """None if the variant can run here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA only"
    mod = _MODULES.get(name)
    if mod is not None:
        try:
            __import__(mod)
        except Exception as e:  # not installed, or a broken build
            return f"not importable ({type(e).__name__})"
    return None


# --- measurement ----------------------------------------------------------------------------------


def make_inputs(N, H, V, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, dtype=dtype, device=device, generator=g).requires_grad_()
    weight = (torch.randn(V, H, dtype=dtype, device=device, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    return hidden, weight, labels


def step(fn, h, w, y):
    h.grad = w.grad = None
    fn(h, w, y).backward()


def time_variant(fn, h, w, y, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median ms of fwd+bwd, peak extra bytes beyond the inputs and the two gradients)."""
    for _ in range(warmup):
        step(fn, h, w, y)
    h.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, h, w, y)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        h.grad = w.grad = None  # before the next step, so that the peak never holds two sets of grads
    grads = h.numel() * h.element_size() + w.numel() * w.element_size()
    peak = torch.cuda.max_memory_allocated() - base - grads
    times.sort()
    return times[len(times) // 2], peak


def matmul_tflops(n: int = 8192, reps: int = 20, dtype=torch.bfloat16) -> float:
    """The device's dense bf16 matmul throughput: a large square ``torch.matmul``."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def run_table(N, H, V, reps, peak_tflops):
    h, w, y = make_inputs(N, H, V)
    flops = 8 * N * H * V
    logits_bytes = N * V * 2
    print(f"\nhidden [{N}, {H}] @ weight [{V}, {H}] bf16, fwd+bwd, median of {reps}; "
          f"8NHV = {flops / 1e12:.1f} TFLOP; bf16 logits [N, V] = {logits_bytes / 2**30:.2f} GiB")
    print(f"{'variant':22s} {'ms':>9s} {'TFLOP/s':>8s} {'% mm':>6s} {'extra GiB':>10s} {'% logits':>9s}")
    for name, fn in VARIANTS.items():
        why = available(name)
        if why:
            print(f"{name:22s} skipped: {why}")
            continue
        try:
            ms, extra = time_variant(fn, h, w, y, reps)
        except Exception as e:  # one baseline failing (OOM, compile error) must not hide the others
            print(f"{name:22s} error: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}")
            h.grad = w.grad = None
            torch.cuda.empty_cache()
            continue
        tf = flops / (ms * 1e-3) / 1e12
        print(f"{name:22s} {ms:9.2f} {tf:8.1f} {100 * tf / peak_tflops:6.1f} {extra / 2**30:10.3f} {100 * extra / logits_bytes:9.2f}")
        torch.cuda.empty_cache()


# --- pytest-benchmark -----------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("H", [896, 4096])
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_linear_logprobs_fwd_bwd(benchmark, name, H):
        why = available(name)
        if why:
            pytest.skip(why)
        h, w, y = make_inputs(8192, H, 151936)
        step(VARIANTS[name], h, w, y)  # warm-up / compile
        benchmark(lambda: (step(VARIANTS[name], h, w, y), torch.cuda.synchronize()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--H", type=int, nargs="+", default=[896, 4096])
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear_logprobs: needs a CUDA GPU (the fused kernels and the baselines it compares are GPU code); nothing to do.")
        return
    import triton

    peak = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"bf16 matmul (8192^3 torch.matmul): {peak:.0f} TFLOP/s")
    for H in a.H:
        run_table(a.N, H, a.V, a.reps, peak)


if __name__ == "__main__":
    main()
