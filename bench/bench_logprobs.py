"""Benchmark: per-token log-probs + entropy from logits, ours vs the ways RLHF libraries write it.

    python bench/bench_logprobs.py                     # CUDA if present: N=8192, V=151936 bf16
    python bench/bench_logprobs.py --device cpu        # torch variants at a small shape + linear-path memory
    pytest bench/bench_logprobs.py --benchmark-enable  # the same variants under pytest-benchmark

Variants (each returns per-token log-probs and entropy; all at temperature 1):

* ``fastppo-triton``: our Triton kernel (CUDA); ``fastppo-triton-inplace``: with ``inplace_backward``;
* ``fastppo-torch``: our chunked PyTorch path;
* ``trl``: TRL's ``selective_log_softmax`` (logsumexp - gather for fp32, a per-sequence loop of
  log_softmax for bf16) and ``entropy_from_logits`` (log_softmax in chunks of 128 rows);
* ``openrlhf/verl``: ``log_softmax`` + gather in float32, entropy as ``logsumexp - sum softmax * logits``;
* ``torch.compile``: the naive float32 log_softmax/gather/entropy, compiled;
* ``liger``, ``flash-attn``: their fused cross-entropy (log-prob only, no entropy), when importable.

Bandwidth counts the logits' bytes the op cannot avoid: read once (forward), or read twice and the
gradient written once (forward + backward); ``% copy`` puts it against a device-to-device copy measured
in the same run (bytes read + written), the ceiling the goal is stated against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastppo

# --- the variants ---------------------------------------------------------------------------------


def fastppo_triton(logits, labels, inplace=False):
    with fastppo.use_backend("triton"):
        return fastppo.logprobs_and_entropy(logits, labels, inplace_backward=inplace)


def fastppo_torch(logits, labels):
    with fastppo.use_backend("torch"):
        return fastppo.logprobs_and_entropy(logits, labels)


def trl_selective_log_softmax(logits, index):
    """TRL (trl/trainer/utils.py), as written there."""
    if logits.dtype in [torch.float32, torch.float64]:
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        per_token_logps = selected_logits - logsumexp_values
    else:
        per_token_logps = []
        for row_logits, row_labels in zip(logits, index):
            row_logps = F.log_softmax(row_logits, dim=-1)
            row_per_token_logps = row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1)
            per_token_logps.append(row_per_token_logps)
        per_token_logps = torch.stack(per_token_logps)
    return per_token_logps


def trl_entropy_from_logits(logits, chunk_size=128):
    """TRL (trl/trainer/utils.py), as written there."""
    original_shape = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(entropies, dim=0).reshape(original_shape)


def trl(logits, labels):
    return trl_selective_log_softmax(logits, labels), trl_entropy_from_logits(logits)


def openrlhf_verl(logits, labels):
    """OpenRLHF/verl: log_softmax + gather in float32; verl's entropy_from_logits."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pd = F.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return logp, entropy


def naive(logits, labels):
    lsm = F.log_softmax(logits.float(), dim=-1)
    return lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


_compiled = None


def compiled_naive(logits, labels):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive, dynamic=False)
    return _compiled(logits, labels)


def liger(logits, labels):
    from liger_kernel.transformers.functional import liger_cross_entropy

    loss = liger_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return -loss.view(labels.shape), None


def flash_attn_ce(logits, labels):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    loss, _ = cross_entropy_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return -loss.view(labels.shape), None


VARIANTS = {
    "fastppo-triton": fastppo_triton,
    "fastppo-triton-inplace": lambda x, y: fastppo_triton(x, y, inplace=True),
    "fastppo-torch": fastppo_torch,
    "trl": trl,
    "openrlhf/verl": openrlhf_verl,
    "torch.compile": compiled_naive,
    "liger": liger,
    "flash-attn": flash_attn_ce,
}
CUDA_ONLY = {"fastppo-triton", "fastppo-triton-inplace", "liger", "flash-attn"}


def available(name: str, device: str) -> str | None:
    """None if the variant can run on ``device``, else why not."""
    if name in CUDA_ONLY and device != "cuda":
        return "CUDA only"
    mod = {"liger": "liger_kernel", "flash-attn": "flash_attn"}.get(name)
    if mod is not None:
        try:
            __import__(mod)
        except Exception as e:  # not installed, or a broken build
            return f"not importable ({type(e).__name__})"
    return None


# --- measurement ----------------------------------------------------------------------------------


def make_inputs(N, V, dtype, device, seq=1024):
    B = max(1, N // seq)
    logits = torch.randn(B, N // B, V, dtype=dtype, device=device) * 2
    labels = torch.randint(0, V, (B, N // B), device=device)
    return logits, labels


def step(fn, logits, labels, backward: bool):
    if not backward:
        with torch.no_grad():
            fn(logits, labels)
        return
    x = logits.requires_grad_()
    lp, ent = fn(x, labels)
    loss = lp.sum() if ent is None else lp.sum() + ent.sum()
    # autograd.grad, not backward(): accumulating into a leaf's .grad would copy an in-place gradient
    # (ours with inplace_backward, Liger's always) out of the logits buffer, timing a copy they avoid.
    torch.autograd.grad(loss, x)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(fn, logits, labels, backward: bool, reps: int, warmup: int = 2) -> tuple[float, float | None]:
    """(median ms, peak extra CUDA memory GiB or None)."""
    device = logits.device.type
    for _ in range(warmup):
        step(fn, logits, labels, backward)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(fn, logits, labels, backward)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    return 1e3 * times[len(times) // 2], peak


def copy_bandwidth(device: str, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """The device's measured memory bandwidth in GB/s: a large device-to-device copy, counting the
    bytes read plus the bytes written (median of ``reps``). The ceiling the kernels are held to."""
    if device != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def run_table(N, V, dtype, device, reps, ceiling_gbs=None):
    logits, labels = make_inputs(N, V, dtype, device)
    nbytes = logits.numel() * logits.element_size()
    ceiling_gbs = ceiling_gbs or copy_bandwidth(device)
    print(
        f"\nlogits [{N}, {V}] {str(dtype).replace('torch.', '')} on {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, triton {_triton_version()}; median of {reps}; "
        f"copy bandwidth {ceiling_gbs:.0f} GB/s (read + write, same run)"
    )
    print(f"{'variant':24s} {'mode':8s} {'ms':>10s} {'GB/s':>8s} {'% copy':>7s} {'peak GiB':>9s}")
    for name, fn in VARIANTS.items():
        why = available(name, device)
        if why:
            print(f"{name:24s} skipped: {why}")
            continue
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            try:
                ms, peak = time_variant(fn, logits.detach().clone(), labels, backward, reps)
            except Exception as e:  # one baseline failing must not hide the others
                print(
                    f"{name:24s} {mode:8s} error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                )
                continue
            gbs = nbytes * (3 if backward else 1) / (ms * 1e-3) / 1e9
            peak_s = f"{peak:9.2f}" if peak is not None else f"{'-':>9s}"
            print(f"{name:24s} {mode:8s} {ms:10.2f} {gbs:8.1f} {100 * gbs / ceiling_gbs:6.1f}% {peak_s}")
    return ceiling_gbs


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


# --- the hidden-state path: peak memory, each variant in a fresh process ----------------------------

LINEAR_SHAPE = dict(N=8192, H=128, V=32768)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset the peak RSS (Linux ``clear_refs`` 5) and return the current RSS in bytes.

    Without the reset, ``ru_maxrss`` would still hold the peak of ``import torch``, which hides any
    growth smaller than that import's transient memory.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def _peak_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def linear_child(variant: str, N: int, H: int, V: int) -> dict:
    """Forward + backward of one linear variant; reports the peak-RSS growth over the RSS with the inputs."""
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    before = _reset_peak()
    t0 = time.perf_counter()
    if variant == "naive":
        logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        logp.sum().backward()
    elif variant == "naive+entropy":
        lsm = torch.log_softmax(hidden @ weight.T, dim=-1)
        logp = lsm.gather(-1, labels[:, None]).squeeze(-1)
        (logp.sum() - (lsm.exp() * lsm).sum()).backward()
    else:
        with fastppo.use_backend("torch"):
            lp, ent = fastppo.linear_logprobs_and_entropy(
                hidden, weight, labels, entropy=variant == "fastppo-torch+entropy"
            )
        (lp.sum() if ent is None else lp.sum() + ent.sum()).backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "growth_bytes": _peak_bytes() - before, "seconds": seconds}


def run_linear_memory(N, H, V):
    print(
        f"\nlinear path, hidden [{N}, {H}] @ weight [{V}, {H}] float32, forward + backward, CPU "
        f"(peak RSS growth over the RSS holding the inputs: VmHWM after resetting it, one fresh process per variant)"
    )
    print(f"{'variant':24s} {'peak growth MiB':>16s} {'vs naive':>9s} {'s':>7s}")
    base = None
    for variant in ("naive", "fastppo-torch", "naive+entropy", "fastppo-torch+entropy"):
        out = subprocess.run(
            [sys.executable, __file__, "--linear-child", variant, "--N", str(N), "--H", str(H), "--V", str(V)],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, FASTPPO_BACKEND="torch"),
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if variant.startswith("naive"):
            base = r["growth_bytes"]
        print(f"{variant:24s} {r['growth_bytes'] / 2**20:16.1f} {r['growth_bytes'] / base:9.3f} {r['seconds']:7.2f}")


# --- pytest-benchmark -----------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _DEV = "cuda" if torch.cuda.is_available() else "cpu"
    _SHAPE = (
        dict(N=8192, V=151936, dtype=torch.bfloat16) if _DEV == "cuda" else dict(N=256, V=32000, dtype=torch.float32)
    )

    @pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_logprobs_entropy(benchmark, name, backward):
        why = available(name, _DEV)
        if why:
            pytest.skip(why)
        logits, labels = make_inputs(_SHAPE["N"], _SHAPE["V"], _SHAPE["dtype"], _DEV)
        step(VARIANTS[name], logits, labels, backward)  # warm-up / compile
        benchmark(lambda: (step(VARIANTS[name], logits, labels, backward), _sync(_DEV)))

    @pytest.mark.parametrize("name", ["naive", "fastppo-torch"])
    def test_linear_fwd_bwd(benchmark, name):
        benchmark(linear_child, name, 1024, 128, 8192)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--H", type=int, default=LINEAR_SHAPE["H"])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--linear-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.linear_child:
        print(json.dumps(linear_child(a.linear_child, a.N, a.H, a.V)))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if device == "cuda":
        # The goal's vocabulary (Qwen2, rows 16-byte aligned), then GPT-2's odd one (unaligned rows).
        ceiling = None
        for V in [a.V] if a.V else [151936, 50257]:
            ceiling = run_table(a.N or 8192, V, dtypes[a.dtype or "bf16"], device, a.reps or 10, ceiling)
    else:
        for dt in [a.dtype] if a.dtype else ["fp32", "bf16"]:
            run_table(a.N or 512, a.V or 32000, dtypes[dt], device, a.reps or 3)
        run_linear_memory(LINEAR_SHAPE["N"], a.H, LINEAR_SHAPE["V"] if a.V is None else a.V)


if __name__ == "__main__":
    main()
