"""Which bf16 tiles of the fused linear log-prob kernels are fastest on this GPU (CUDA only).

    python -m fastppo.bench.tune_linear [--N 8192] [--H 896 4096] [--V 151936]

The shipped tiles were chosen from register counts, with no GPU at hand. The alternatives in
``SWEEP`` were spill-free on sm_80 and sm_90 with Triton 3.6 and 3.9 and fit an A100's shared memory
when written; each is re-checked on this machine (compile_check's compile, for this GPU's arch) and
skipped if it spills here. One kernel varies at a time, the others keep the shipped tiles; each
candidate's gradients are checked against the shipped tiles' before it is timed (fwd+bwd, the
harness's timer). Edit ``GPU_CONFIGS`` in ``kernels/linear_logprobs.py`` with what wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import fastppo
from fastppo.bench.timing import CUDA_TIMER, measure

SWEEP = {  # stage: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)
    "fwd": [(128, 128, 64, 8, 2), (128, 128, 32, 8, 2), (64, 256, 64, 8, 3)],
    "dz": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4)],
    "dx": [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (64, 64, 128, 4, 4)],
}


def _spills_here(stage: str, tiles) -> str | None:
    """Compile this stage's kernels with ``tiles`` for this GPU; None if clean, else why not."""
    from fastppo.kernels import linear_logprobs as K
    from fastppo.kernels.compile_check import compile_one, verdict

    kern = {"fwd": K._linear_lse_fwd_kernel, "dz": K._linear_dz_kernel, "dx": K._linear_dx_kernel}[stage]
    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    for spec in K.COMPILE_SPECS:
        # the variants the sweep runs: bf16, aligned, entropy on, no bias
        if spec.kernel is not kern or not spec.label.startswith("bf16 al=1"):
            continue
        if "ent=0" in spec.label or "bias=1" in spec.label:
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


def sweep(n: int, h: int, v: int) -> None:
    from fastppo.kernels import linear_logprobs as K

    key = ("16", True)
    shipped = K.GPU_CONFIGS[key]
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g, dtype=torch.bfloat16) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)

    def step():
        with fastppo.use_backend("triton"):
            lp, ent = fastppo.linear_logprobs_and_entropy(hidden, weight, labels)
        return torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight])

    flops = 6 * n * h * v
    print(f"\ntile sweep, hidden [{n}, {h}] @ weight [{v}, {h}] bf16, fastppo-triton fwd+bwd")
    print(f"{'kernel':6s} {'tiles (N, V, H, warps, stages)':32s} {'ms':>9s} {'TFLOP/s':>8s} {'rel diff':>9s}")
    want = [t.float() for t in step()]
    try:
        for stage, candidates in SWEEP.items():
            for c in candidates:
                tiles = K.Tiles(*c)
                why = _spills_here(stage, tiles)
                if why:
                    print(f"{stage:6s} {c!s:32s} skipped: {why}")
                    continue
                K.GPU_CONFIGS[key] = dataclasses.replace(shipped, **{stage: tiles})
                got = [t.float() for t in step()]
                diff = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))
                ms = measure(step, "cuda", CUDA_TIMER).time_ms
                mark = "  (shipped)" if tiles == getattr(shipped, stage) else ""
                bad = "  MISMATCH" if not diff < 1e-2 else ""
                print(f"{stage:6s} {c!s:32s} {ms:9.2f} {flops / (ms * 1e-3) / 1e12:8.1f} {diff:9.1e}{mark}{bad}")
    finally:
        K.GPU_CONFIGS[key] = shipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastppo.bench.tune_linear", description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--H", type=int, nargs="+", default=[896, 4096])
    p.add_argument("--V", type=int, default=151936)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_linear: needs a CUDA GPU (it times the fused kernels' tiles); nothing to do.")
        return 0
    for h in a.H:
        sweep(a.N, h, a.V)
    return 0


if __name__ == "__main__":
    sys.exit(main())
