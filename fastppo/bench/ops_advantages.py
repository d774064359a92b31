"""Cases: GAE and masked whitening, ours against the TRL, OpenRLHF and verl code and
``torch.compile`` of our reference, on float32 ``[B, T]`` inputs with right-padded masks.

On right-padded data every GAE computes the same advantages and returns on valid positions (ours
and verl's skip masked positions, the classic loops of TRL and OpenRLHF see them zeroed, which
is the same there); TRL's inputs come zeroed on padding, as its trainer masks them before the
loop. ``gamma = 0.99``, ``lam = 0.95``. Whitening: TRL and verl use the unbiased variance as we do,
OpenRLHF the biased one. Both ops run forward only (never differentiated). Bytes: rewards and
values (or the input) and the bool mask read once, the outputs written once.
"""

from __future__ import annotations

import torch

import fastppo
from fastppo.bench import baselines as B
from fastppo.bench.cases import BenchConfig, Case, Impl, Work, tensor_bytes
from fastppo.reference import advantages as ref

GAMMA, LAM = 0.99, 0.95
GAE_SHAPES = {"cuda": [(64, 1024)], "cpu": [(64, 1024)], "quick": [(16, 128)]}
WHITEN_SHAPES = {"cuda": [(64, 1024), (256, 4096)], "cpu": [(64, 1024), (256, 4096)], "quick": [(16, 256)]}


def make_inputs(b: int, t: int, device: str) -> dict:
    """``r, v, x [b, t]`` float32, ``mask`` bool (right padding), ``maskf``; ``r0, v0`` zeroed on padding."""
    g = torch.Generator().manual_seed(0)
    x = {"r": torch.randn(b, t, generator=g), "v": torch.randn(b, t, generator=g)}
    x["x"] = 2 * torch.randn(b, t, generator=g) + 1
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    x["mask"] = torch.arange(t)[None, :] < lengths[:, None]
    x = {k: v.to(device) for k, v in x.items()}
    x["maskf"] = x["mask"].float()
    x["r0"], x["v0"] = x["r"] * x["maskf"], x["v"] * x["maskf"]
    return x


def _ours(op, backend: str, *args, **kw):
    with fastppo.use_backend(backend):
        return op(*args, **kw)


def _gae_impls(cfg: BenchConfig) -> list[Impl]:
    s = B.SOURCES

    def ours(backend):
        return lambda x: _ours(fastppo.gae, backend, x["r"], x["v"], x["mask"], gamma=GAMMA, lam=LAM)

    return [
        Impl("fastppo-triton", ours("triton"), "fastppo Triton kernel (one launch)", False, cfg.needs(cuda=True)),
        Impl("fastppo-torch", ours("torch"), "fastppo PyTorch reference (blocked, loop-free)", False),
        Impl(
            "torch.compile(ref)",
            lambda x: B.compiled(ref.gae)(x["r"], x["v"], x["mask"], GAMMA, LAM),
            "torch.compile of fastppo's PyTorch reference",
            True,
            cfg.needs(compile=True),
        ),
        Impl("trl", lambda x: B.trl_gae(x["r0"], x["v0"], GAMMA, LAM), str(s["trl_gae"]), True),
        Impl(
            "openrlhf", lambda x: B.openrlhf_gae(x["v"], x["r"], x["maskf"], GAMMA, LAM), str(s["openrlhf_gae"]), True
        ),
        Impl("verl", lambda x: B.verl_gae(x["r"], x["v"], x["maskf"], GAMMA, LAM), str(s["verl_gae"]), True),
    ]


def _whiten_impls(cfg: BenchConfig) -> list[Impl]:
    s = B.SOURCES

    def ours(backend):
        return lambda x: (_ours(fastppo.masked_whiten, backend, x["x"], x["mask"]),)

    return [
        Impl("fastppo-torch", ours("torch"), "fastppo PyTorch path (no host sync)", False),
        Impl(
            "torch.compile(ref)",
            lambda x: (B.compiled(ref.masked_whiten)(x["x"], x["mask"]),),
            "torch.compile of fastppo's PyTorch reference",
            True,
            cfg.needs(compile=True),
        ),
        Impl("trl", lambda x: (B.trl_masked_whiten(x["x"], x["mask"]),), str(s["trl_masked_whiten"]), True),
        Impl(
            "openrlhf",
            lambda x: tuple(B.openrlhf_normalize_advantages([x["x"]], [x["maskf"]])),
            str(s["openrlhf_normalize_advantages"]),
            True,
        ),
        Impl("verl", lambda x: (B.verl_masked_whiten(x["x"], x["maskf"]),), str(s["verl_masked_whiten"]), True),
    ]


def _cases(op: str, cfg: BenchConfig, shapes: dict, impls, reads: tuple[str, ...], outputs: int) -> list[Case]:
    cases = []
    for b, t in shapes["quick" if cfg.quick else cfg.device]:

        def work(x, pass_):
            return Work(tensor_bytes(*(x[k] for k in reads)) + outputs * tensor_bytes(x[reads[0]]), "GB/s", "copy_gbs")

        cases.append(
            Case(
                op=op,
                shape=f"B={b} T={t}",
                dtype="float32",
                device=cfg.device,
                make_inputs=lambda b=b, t=t: make_inputs(b, t, cfg.device),
                impls=impls(cfg),
                work=work,
                passes=("fwd",),
                compared=outputs,
                valid="mask",
            )
        )
    return cases


def gae_cases(cfg: BenchConfig) -> list[Case]:
    return _cases("gae", cfg, GAE_SHAPES, _gae_impls, ("r", "v", "mask"), 2)


def whiten_cases(cfg: BenchConfig) -> list[Case]:
    return _cases("whiten", cfg, WHITEN_SHAPES, _whiten_impls, ("x", "mask"), 1)
