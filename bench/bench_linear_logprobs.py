"""Benchmark: per-token log-probs + entropy from the last hidden states, fused vs the usual ways.

    python bench/bench_linear_logprobs.py                      # CUDA: N=8192, V=151936, bf16, H=896 and 4096
    python bench/bench_linear_logprobs.py --H 896 --reps 5     # one hidden size
    python bench/bench_linear_logprobs.py --sweep              # time alternative bf16 tiles (SWEEP)
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
import dataclasses
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
    print(
        f"\nhidden [{N}, {H}] @ weight [{V}, {H}] bf16, fwd+bwd, median of {reps}; "
        f"8NHV = {flops / 1e12:.1f} TFLOP; bf16 logits [N, V] = {logits_bytes / 2**30:.2f} GiB"
    )
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
        print(
            f"{name:22s} {ms:9.2f} {tf:8.1f} {100 * tf / peak_tflops:6.1f} "
            f"{extra / 2**30:10.3f} {100 * extra / logits_bytes:9.2f}"
        )
        torch.cuda.empty_cache()


# --- tile sweep: which bf16 tiles are fastest on this GPU ----------------------------------------------
# The shipped tiles were chosen from register counts, with no GPU at hand. These alternatives were
# spill-free on sm_80 and sm_90 with Triton 3.6 and 3.9 and fit an A100's shared memory when written;
# the sweep re-checks each on this machine (compile_check's compile, for this GPU's arch) and skips
# any that spills here. One kernel varies at a time, the others keep the shipped tiles.
def _tiles(*a):
    from fastppo.kernels.linear_logprobs import Tiles

    return Tiles(*a)


SWEEP = {
    "fwd": [(128, 128, 64, 8, 2), (128, 128, 32, 8, 2), (64, 256, 64, 8, 3)],
    "dz": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4)],
    "dx": [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (64, 64, 128, 4, 4)],
}


def _spills_here(stage: str, tiles) -> str | None:
    """Compile this stage's kernels with ``tiles`` for this GPU; None if clean, else why not."""
    import dataclasses

    from fastppo.kernels import linear_logprobs as K
    from fastppo.kernels.compile_check import compile_one, verdict

    kern = {"fwd": K._linear_lse_fwd_kernel, "dz": K._linear_dz_kernel, "dx": K._linear_dx_kernel}[stage]
    cc = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    for spec in K.COMPILE_SPECS:
        # The variants the sweep runs: bf16, aligned, entropy on, no bias (the backward's dx: all four).
        if (
            spec.kernel is not kern
            or not spec.label.startswith("bf16 al=1")
            or "ent=0" in spec.label
            or "bias=1" in spec.label
        ):
            continue
        spec = dataclasses.replace(
            spec,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            constexprs=dict(spec.constexprs, BLOCK_N=tiles.BLOCK_N, BLOCK_V=tiles.BLOCK_V, BLOCK_H=tiles.BLOCK_H),
        )
        why = verdict(spec, compile_one(spec, cc), cc)
        if why != "ok":
            return f"{spec.label}: {why}"
    return None


def run_sweep(N, H, V, reps):
    from fastppo.kernels import linear_logprobs as K

    key = ("16", True)
    shipped = K.GPU_CONFIGS[key]
    h, w, y = make_inputs(N, H, V)
    flops = 8 * N * H * V
    print(f"\ntile sweep, hidden [{N}, {H}] @ weight [{V}, {H}] bf16, fastppo-triton fwd+bwd, median of {reps}")
    print(f"{'kernel':6s} {'tiles (N, V, H, warps, stages)':32s} {'ms':>9s} {'TFLOP/s':>8s} {'rel diff':>9s}")

    def result():  # loss and gradients, to check each candidate against the shipped tiles
        step(fastppo_triton, h, w, y)
        out = (h.grad.float().clone(), w.grad.float().clone())
        h.grad = w.grad = None
        return out

    want = result()
    try:
        for stage, candidates in SWEEP.items():
            for c in candidates:
                tiles = _tiles(*c)
                why = _spills_here(stage, tiles)
                if why:
                    print(f"{stage:6s} {c!s:32s} skipped: {why}")
                    continue
                K.GPU_CONFIGS[key] = dataclasses.replace(shipped, **{stage: tiles})
                got = result()
                diff = max(float((g - e).norm() / e.norm()) for g, e in zip(got, want))
                ms, _ = time_variant(fastppo_triton, h, w, y, reps)
                mark = "  (shipped)" if tiles == getattr(shipped, stage) else ""
                bad = "  MISMATCH" if not diff < 1e-2 else ""
                print(f"{stage:6s} {c!s:32s} {ms:9.2f} {flops / (ms * 1e-3) / 1e12:8.1f} {diff:9.1e}{mark}{bad}")
    finally:
        K.GPU_CONFIGS[key] = shipped


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
    p.add_argument(
        "--sweep", action="store_true", help="time the alternative bf16 tiles (SWEEP) instead of the variants"
    )
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_linear_logprobs: needs a CUDA GPU (the fused kernels and the baselines it compares are GPU "
            "code); nothing to do."
        )
        return
    import triton

    peak = matmul_tflops()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"bf16 matmul (8192^3 torch.matmul): {peak:.0f} TFLOP/s"
    )
    for H in a.H:
        if a.sweep:
            run_sweep(a.N, H, a.V, a.reps)
        else:
            run_table(a.N, H, a.V, a.reps, peak)


if __name__ == "__main__":
    main()
