"""PPO losses: fastppo's Triton kernels vs its PyTorch reference vs verl/OpenRLHF-style torch vs torch.compile.

    pytest bench/bench_losses.py --benchmark-enable                  # pytest-benchmark (B=64, T=1024)
    python bench/bench_losses.py [--sizes 64x1024 256x4096] [--no-compile] [--threads 1]

Each row times a training step's share of the op: forward with autograd graph, then ``backward()``
of the loss (policy, value) or of ``kl.sum()`` (KL), in float32. Column ``fwd`` is the forward alone
under ``torch.no_grad()`` (what a rollout-side logging pass costs). Every candidate computes the
same thing: token-mean aggregation, ``clip_low = clip_high = 0.2``, dual clip 3.0 (verl's default
``clip_ratio_c``), value clip 0.2, the k3 ("low_var_kl") estimator.

The baselines are written the way those projects write them (verl ``core_algos.compute_policy_loss``
/ ``compute_value_loss`` / ``kl_penalty``; OpenRLHF ``PolicyLoss`` / ``ValueLoss`` /
``compute_approx_kl``), with their stats where they compute them. The Triton rows run on CUDA only;
on a CPU-only machine the script still times the torch rows (and ``torch.compile`` of the
reference, which needs a C++ compiler; ``--no-compile`` skips it).

CPU rows run with one torch thread by default (``--threads``): the machine this is developed on is
shared, and multi-threaded elementwise ops stall whenever a sibling thread is descheduled.
"""

from __future__ import annotations

import argparse
import platform
import time

import pytest
import torch

import fastppo
from fastppo.reference import losses as ref

CLIP, DUAL_CLIP, VALUE_CLIP = 0.2, 3.0, 0.2


# ---------------------------------------------------------------- baselines (as the projects write them)


def verl_masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=CLIP, clip_ratio_c=DUAL_CLIP):
    """verl.trainer.ppo.core_algos.compute_policy_loss (vanilla, dual clip, loss_agg_mode="token-mean")."""
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_masked_mean(pg_losses, response_mask)  # agg_loss(..., "token-mean")
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value=VALUE_CLIP):
    """verl.trainer.ppo.core_algos.compute_value_loss (token-mean)."""
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)  # clip_by_value
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_masked_mean(clipped_vf_losses, response_mask)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


def verl_kl_penalty(logprob, ref_logprob):
    """verl.trainer.ppo.core_algos.kl_penalty(..., "low_var_kl")."""
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


def openrlhf_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_policy_loss(
    log_probs, old_log_probs, advantages, action_mask, clip_eps_low=CLIP, clip_eps_high=CLIP, dual_clip=DUAL_CLIP
):
    """openrlhf.models.loss.PolicyLoss.forward (token_level_loss=True)."""
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    ppo_kl = openrlhf_masked_mean(-log_ratio.detach(), action_mask, dim=None)
    loss = openrlhf_masked_mean(loss, action_mask, dim=None)
    return loss, clip_ratio, ppo_kl


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=VALUE_CLIP):
    """openrlhf.models.loss.ValueLoss.forward (token-level mean)."""
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    surr1 = (values_clipped - returns) ** 2
    surr2 = (values - returns) ** 2
    loss = torch.max(surr1, surr2)
    loss = openrlhf_masked_mean(loss, action_mask, dim=None)
    return 0.5 * loss


def openrlhf_kl(log_probs, log_probs_base, action_mask):
    """openrlhf.models.utils.compute_approx_kl(kl_estimator="k3")."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if action_mask is not None:
        log_ratio = log_ratio * action_mask
    log_ratio = -log_ratio
    log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio


# ---------------------------------------------------------------- inputs and candidates


def make_inputs(b, t, device="cpu"):
    g = torch.Generator().manual_seed(0)
    lp = -3.0 * torch.rand(b, t, generator=g)
    x = {
        "lp": lp,
        "old": lp + 0.1 * torch.randn(b, t, generator=g),
        "adv": torch.randn(b, t, generator=g),
        "v": torch.randn(b, t, generator=g),
        "ret": torch.randn(b, t, generator=g),
        "ref": lp + 0.1 * torch.randn(b, t, generator=g),
    }
    x["oldv"] = x["v"] + 0.3 * torch.randn(b, t, generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    x = {k: v.to(device) for k, v in x.items()}
    x["mask"] = (torch.arange(t)[None, :] < lengths[:, None]).to(device)  # right padding
    x["maskf"] = x["mask"].float()
    return x


def _ours(op, backend):
    def fn(**kw):
        with fastppo.use_backend(backend):
            return op(**kw)

    return fn


def candidates(op: str, device: str, compile_ref: bool):
    """``{name: f(x) -> (scalar objective, param)}``: x holds the inputs; param is the tensor that gets a gradient."""
    if op == "policy":

        def ours(backend):
            return lambda x: _ours(fastppo.policy_loss, backend)(
                logprobs=x["lp"],
                old_logprobs=x["old"],
                advantages=x["adv"],
                mask=x["mask"],
                clip_low=CLIP,
                dual_clip=DUAL_CLIP,
            )[0]

        out = {
            "verl": lambda x: verl_policy_loss(x["old"], x["lp"], x["adv"], x["maskf"])[0],
            "OpenRLHF": lambda x: openrlhf_policy_loss(x["lp"], x["old"], x["adv"], x["maskf"])[0],
            "fastppo torch": ours("torch"),
        }
        compiled = torch.compile(ref.policy_loss) if compile_ref else None
        if compiled is not None:
            out["torch.compile(ref)"] = lambda x: compiled(
                x["lp"], x["old"], x["adv"], x["mask"], clip_low=CLIP, dual_clip=DUAL_CLIP
            )[0]
        param = "lp"
    elif op == "value":

        def ours(backend):
            return lambda x: _ours(fastppo.value_loss, backend)(
                values=x["v"], old_values=x["oldv"], returns=x["ret"], mask=x["mask"], clip=VALUE_CLIP
            )[0]

        out = {
            "verl": lambda x: verl_value_loss(x["v"], x["ret"], x["oldv"], x["maskf"])[0],
            "OpenRLHF": lambda x: openrlhf_value_loss(x["v"], x["oldv"], x["ret"], x["maskf"]),
            "fastppo torch": ours("torch"),
        }
        compiled = torch.compile(ref.value_loss) if compile_ref else None
        if compiled is not None:
            out["torch.compile(ref)"] = lambda x: compiled(x["v"], x["oldv"], x["ret"], x["mask"], clip=VALUE_CLIP)[0]
        param = "v"
    else:  # kl: per-token k3, objective kl.sum()

        def ours(backend):
            return lambda x: _ours(fastppo.kl_penalty, backend)(
                logprobs=x["lp"], ref_logprobs=x["ref"], kind="k3", mask=x["mask"]
            ).sum()

        out = {
            "verl": lambda x: (verl_kl_penalty(x["lp"], x["ref"]) * x["maskf"]).sum(),  # its agg_loss masks
            "OpenRLHF": lambda x: openrlhf_kl(x["lp"], x["ref"], x["maskf"]).sum(),
            "fastppo torch": ours("torch"),
        }
        compiled = torch.compile(ref.kl_penalty) if compile_ref else None
        if compiled is not None:
            out["torch.compile(ref)"] = lambda x: compiled(x["lp"], x["ref"], kind="k3", mask=x["mask"]).sum()
        param = "lp"
    if device == "cuda":
        out["fastppo triton"] = ours("triton")
    return out, param


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, x, param):
    """Forward with graph, then backward; clears the gradient first."""
    x[param].grad = None
    fn(x).backward()


# ---------------------------------------------------------------- pytest-benchmark

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ["verl", "OpenRLHF", "fastppo torch", "torch.compile(ref)", "fastppo triton"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("op", ["policy", "value", "kl"])
def test_bench_losses(benchmark, one_thread, op, name, device):
    if name == "fastppo triton" and device != "cuda":
        pytest.skip("the Triton kernels are benchmarked on CUDA only")
    b, t = (64, 1024)
    fns, param = candidates(op, device, compile_ref=name == "torch.compile(ref)")
    x = make_inputs(b, t, device)
    x[param].requires_grad_()
    fn = fns[name]
    step(fn, x, param)  # warm-up: compiles (Triton, torch.compile) outside the timing

    def call():
        step(fn, x, param)
        _sync(device)

    benchmark.group = f"{op} loss fwd+bwd B={b} T={t} float32 {device}"
    benchmark(call)


# ---------------------------------------------------------------- script mode


def _time(fn, device, min_time=0.3):
    """Median seconds per call (the machine may be shared: the median ignores interference spikes)."""
    for _ in range(3):
        fn()
    _sync(device)
    times, t_start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["64x1024", "256x4096"], help="BxT shapes")
    p.add_argument("--ops", nargs="+", default=["policy", "value", "kl"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU rows (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU: {platform.processor() or platform.machine()}"
    )
    if torch.cuda.is_available():
        import triton

        print(f"GPU: {torch.cuda.get_device_name()}, triton {triton.__version__}")
    print(
        f"{'op':6}  {'shape':9}  {'device':6}  {'implementation':18}  {'fwd+bwd ms':>10}  {'fwd ms':>8}  "
        f"{'vs verl':>7}  {'|loss - verl|':>13}"
    )
    for size in args.sizes:
        b, t = (int(s) for s in size.lower().split("x"))
        for device in DEVICES:
            x = make_inputs(b, t, device)
            for op in args.ops:
                fns, param = candidates(op, device, compile_ref=not args.no_compile)
                x[param].requires_grad_()
                with torch.no_grad():
                    base = fns["verl"](x).item()
                rows = {}
                for name, fn in fns.items():
                    full = _time(lambda fn=fn, x=x, param=param: step(fn, x, param), device)

                    def fwd(fn=fn, x=x):
                        with torch.no_grad():
                            fn(x)

                    rows[name] = (full, _time(fwd, device), abs(fn(x).item() - base))
                for name, (full, fwd_t, err) in rows.items():
                    print(
                        f"{op:6}  {f'{b}x{t}':9}  {device:6}  {name:18}  {full * 1e3:10.3f}  {fwd_t * 1e3:8.3f}"
                        f"  {rows['verl'][0] / full:6.1f}x  {err:13.2e}"
                    )
                x[param].requires_grad_(False)
                x[param].grad = None


if __name__ == "__main__":
    main()
