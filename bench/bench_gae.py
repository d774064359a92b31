"""GAE: fastppo's loop-free PyTorch path (and Triton kernel on CUDA) vs the reverse Python loops of verl/OpenRLHF.

    pytest bench/bench_gae.py --benchmark-enable        # pytest-benchmark
    python bench/bench_gae.py [--B 64] [--T 1024]       # table + speedups

Shape B=64 responses x T=1024 tokens, gamma=0.99, lam=0.95, masks with multi-turn holes.
The baselines are the loops as those projects write them (verl without its final whitening, so
that all rows compute the same thing: advantages and returns).

CPU rows run with one torch thread (``--threads`` changes it in script mode): the loops are
bound by per-op overhead on [B]-vectors and gain nothing from threads, and on a shared machine
multi-threaded ops stall whenever a sibling thread is descheduled, which makes timings erratic.
"""

from __future__ import annotations

import argparse
import platform
import time

import pytest
import torch

import fastppo
from fastppo.reference import advantages as ref

B, T, GAMMA, LAM = 64, 1024, 0.99, 0.95


# ---------------------------------------------------------------- baselines


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl.trainer.ppo.core_algos.compute_gae_advantage_return (multi-turn version), minus masked_whiten."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's Experience maker get_advantages_and_returns (classic right-padded loop, as in TRL)."""
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages.detach(), returns


# ---------------------------------------------------------------- inputs and candidates


def make_inputs(b=B, t=T, device="cpu"):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(b, t, generator=g)
    v = torch.randn(b, t, generator=g)
    m = torch.ones(b, t, dtype=torch.bool)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    m &= torch.arange(t)[None, :] < lengths[:, None]  # right padding
    m[:, t // 4 : t // 4 + 32] = False  # a tool-output span inside each response
    return r.to(device), v.to(device), m.to(device)


def candidates(device):
    def ours_torch(r, v, m):
        with fastppo.use_backend("torch"):
            return fastppo.gae(r, v, m, gamma=GAMMA, lam=LAM)

    def ours_triton(r, v, m):
        with fastppo.use_backend("triton"):
            return fastppo.gae(r, v, m, gamma=GAMMA, lam=LAM)

    out = {
        "verl loop": lambda r, v, m: verl_gae(r, v, m.float(), GAMMA, LAM),
        "OpenRLHF loop": lambda r, v, m: openrlhf_gae(v, r, m.float(), GAMMA, LAM),
        "fastppo torch": ours_torch,
    }
    if device == "cuda":
        out["fastppo triton"] = ours_triton
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- pytest-benchmark

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["verl loop", "OpenRLHF loop", "fastppo torch", "fastppo triton"])
def test_bench_gae(benchmark, one_thread, device, name):
    fns = candidates(device)
    if name not in fns:
        pytest.skip("the Triton kernel is benchmarked on CUDA only")
    r, v, m = make_inputs(device=device)
    fn = fns[name]

    def call():
        out = fn(r, v, m)
        _sync(device)
        return out

    benchmark.group = f"gae B={B} T={T} {device}"
    benchmark(call)


# ---------------------------------------------------------------- script mode


def _time(fn, args, device, min_time=0.5):
    """Median seconds per call (the machine may be shared: the median ignores interference spikes)."""
    for _ in range(3):
        fn(*args)
    _sync(device)
    times, t_start = [], time.perf_counter()
    while len(times) < 7 or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    global B, T
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=B)
    p.add_argument("--T", type=int, default=T)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU rows (default 1)")
    args = p.parse_args(argv)
    B, T = args.B, args.T
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU: {platform.processor() or platform.machine()}"
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"B={B} T={T} gamma={GAMMA} lam={LAM}; PyTorch-path block = {ref.GAE_BLOCK}")
    print(f"{'device':6}  {'implementation':16}  {'time (ms)':>10}  {'vs verl loop':>12}  {'vs OpenRLHF':>11}")
    for device in DEVICES:
        r, v, m = make_inputs(B, T, device)
        times = {name: _time(fn, (r, v, m), device) for name, fn in candidates(device).items()}
        for name, t in times.items():
            print(
                f"{device:6}  {name:16}  {t * 1e3:10.3f}  {times['verl loop'] / t:11.1f}x"
                f"  {times['OpenRLHF loop'] / t:10.1f}x"
            )
        # the candidates agree (multi-turn holes: compare ours with verl on valid positions)
        a, _ = candidates(device)["fastppo torch"](r, v, m)
        va, _ = verl_gae(r, v, m.float(), GAMMA, LAM)
        err = (a - va)[m].abs().max().item()
        print(f"{device:6}  max |fastppo - verl| on valid positions: {err:.2e}")


if __name__ == "__main__":
    main()
