"""Cases: per-token log-prob + entropy from logits (``logprobs``) and from hidden states fused with
the lm_head (``linear_logprobs``), ours against the TRL, OpenRLHF and verl code and the fused peers.

``logprobs``: logits ``[B, T, V]`` (rows of ``T`` tokens, as the trainers hold them), labels ``[B, T]``.
Bytes: the logits read once (``fwd``), or read twice and their gradient written once (``fwd+bwd``:
an autograd op learns its upstream gradient only after its forward), plus labels and outputs.

``linear_logprobs``: ``hidden [B, T, H] @ weight[V, H].T``; the libraries' way is the lm_head matmul
followed by their log-prob and entropy code. Flops: ``2 N H V`` forward, ``6 N H V`` forward +
backward (the useful work: kernels that recompute the logits in the backward do ``8 N H V``).
"""

from __future__ import annotations

import torch

import fastppo
from fastppo.bench import baselines as B
from fastppo.bench.cases import BenchConfig, Case, Impl, Work, tensor_bytes
from fastppo.bench.peaks import MATMUL_PEAK

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

LOGITS_SHAPES = {  # (N tokens, V, dtype); rows of T = min(N, 1024) tokens
    "cuda": [(8192, 151936, "bfloat16")],
    "cpu": [(512, 32000, "float32"), (512, 32000, "bfloat16")],
    "quick": [(128, 8192, "float32")],
}
LINEAR_SHAPES = {  # (N, H, V, dtype)
    "cuda": [(8192, 896, 151936, "bfloat16"), (8192, 4096, 151936, "bfloat16")],
    "cpu": [(2048, 128, 32768, "float32")],
    "quick": [(256, 64, 8192, "float32")],
}
ROW_TOKENS = 1024


def _shapes(table: dict, cfg: BenchConfig) -> list:
    return table["quick" if cfg.quick else cfg.device]


def _rows(n: int) -> tuple[int, int]:
    t = min(n, ROW_TOKENS)
    return max(1, n // t), t


def _ours(backend: str, **options):
    def fn(x):
        with fastppo.use_backend(backend):
            if "logits" in x:
                return fastppo.logprobs_and_entropy(x["logits"], x["labels"], **options)
            return fastppo.linear_logprobs_and_entropy(x["hidden"], x["weight"], x["labels"], **options)

    return fn


def naive_logits(logits, labels):
    """The textbook way: float32 ``log_softmax``, gather, ``-sum p log p``."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def naive_linear(hidden, weight, labels):
    return naive_logits(hidden @ weight.T, labels)


def _openrlhf_entropy(cfg: BenchConfig):
    if cfg.compile:
        return B.compiled(B.openrlhf_compute_entropy), "compiled as there"
    return B.openrlhf_compute_entropy, "eager: compile off"


def _library_impls(cfg: BenchConfig, logits_of) -> list[Impl]:
    """TRL, OpenRLHF, verl: their log-prob and entropy code on ``logits_of(x)``."""
    ent, how = _openrlhf_entropy(cfg)
    s = B.SOURCES

    def trl(x):
        z = logits_of(x)
        return B.trl_selective_log_softmax(z, x["labels"]), B.trl_entropy_from_logits(z)

    def openrlhf(x):
        z = logits_of(x)
        return B.openrlhf_log_probs_from_logits(z, x["labels"]), ent(z)

    def verl(x):
        z = logits_of(x)
        return B.verl_logprobs_from_logits(z, x["labels"]), B.verl_entropy_from_logits(z)

    return [
        Impl("trl", trl, f"{s['trl_selective_log_softmax']} + entropy_from_logits", True),
        Impl("openrlhf", openrlhf, f"{s['openrlhf_log_probs_from_logits']} + compute_entropy ({how})", True),
        Impl("verl", verl, f"{s['verl_logprobs_from_logits']} + entropy_from_logits", True),
    ]


def logprobs_cases(cfg: BenchConfig) -> list[Case]:
    cases = []
    for n, v, dtype in _shapes(LOGITS_SHAPES, cfg):
        b, t = _rows(n)

        def make(b=b, t=t, v=v, dtype=dtype):
            g = torch.Generator(device=cfg.device).manual_seed(0)
            logits = (2 * torch.randn(b, t, v, device=cfg.device, generator=g)).to(DTYPES[dtype])
            labels = torch.randint(0, v, (b, t), device=cfg.device, generator=g)
            return {"logits": logits.requires_grad_(), "labels": labels}

        def work(x, pass_):
            logits = tensor_bytes(x["logits"])
            rest = tensor_bytes(x["labels"]) + 2 * 4 * x["labels"].numel()  # labels, float32 log-prob + entropy
            return Work((3 if pass_ == "fwd+bwd" else 1) * logits + rest, "GB/s", "copy_gbs")

        impls = [
            Impl("fastppo-triton", _ours("triton"), "fastppo Triton kernel", False, cfg.needs(cuda=True)),
            Impl(
                "fastppo-triton-inplace",
                _ours("triton", inplace_backward=True),
                "fastppo Triton kernel, inplace_backward=True",
                False,
                cfg.needs(cuda=True),
                fresh_inputs=True,
                passes=("fwd+bwd",),
            ),
            Impl("fastppo-torch", _ours("torch"), "fastppo PyTorch reference (chunked)", False),
            *_library_impls(cfg, lambda x: x["logits"]),
            Impl(
                "torch.compile",
                lambda x: B.compiled(naive_logits, dynamic=False)(x["logits"], x["labels"]),
                "torch.compile of the float32 log_softmax/gather/entropy",
                True,
                cfg.needs(compile=True),
            ),
            Impl(
                "liger",
                lambda x: (B.liger_logprobs(x["logits"], x["labels"]),),
                f"{B.LIGER.project} {B.LIGER.version} {B.LIGER.file}: liger_cross_entropy (log-prob only)",
                True,
                cfg.needs(cuda=True) or cfg.needs(module="liger_kernel"),
            ),
        ]
        cases.append(
            Case(
                op="logprobs",
                shape=f"N={n} V={v}",
                dtype=dtype,
                device=cfg.device,
                make_inputs=make,
                impls=impls,
                work=work,
                grads=("logits",),
                compared=2,
            )
        )
    return cases


def linear_logprobs_cases(cfg: BenchConfig) -> list[Case]:
    cases = []
    for n, h, v, dtype in _shapes(LINEAR_SHAPES, cfg):
        b, t = _rows(n)

        def make(b=b, t=t, h=h, v=v, dtype=dtype):
            g = torch.Generator(device=cfg.device).manual_seed(0)
            hidden = torch.randn(b, t, h, device=cfg.device, generator=g).to(DTYPES[dtype])
            weight = (torch.randn(v, h, device=cfg.device, generator=g) / h**0.5).to(DTYPES[dtype])
            labels = torch.randint(0, v, (b, t), device=cfg.device, generator=g)
            return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "labels": labels}

        def work(x, pass_, n=n, h=h, v=v, dtype=dtype):
            return Work((6 if pass_ == "fwd+bwd" else 2) * n * h * v, "TFLOP/s", MATMUL_PEAK[dtype])

        def flat(x):
            return x["hidden"].reshape(-1, x["hidden"].shape[-1]), x["weight"], x["labels"].reshape(-1)

        fused = cfg.needs(cuda=True)
        impls = [
            Impl("fastppo-triton", _ours("triton"), "fastppo fused Triton kernels", False, fused),
            Impl(
                "fastppo-triton-noent",
                _ours("triton", entropy=False),
                "fastppo fused Triton kernels, entropy=False",
                False,
                fused,
            ),
            Impl("fastppo-torch", _ours("torch"), "fastppo PyTorch reference (chunked over tokens)", False),
            *_library_impls(cfg, lambda x: x["hidden"] @ x["weight"].T),
            Impl(
                "torch.compile",
                lambda x: B.compiled(naive_linear, dynamic=False)(x["hidden"], x["weight"], x["labels"]),
                "torch.compile of hidden @ weight.T + float32 log_softmax/gather/entropy",
                True,
                cfg.needs(compile=True),
            ),
            Impl(
                "liger",
                lambda x: (B.liger_linear_logprob_sum(*flat(x)),),
                f"{B.LIGER.project} {B.LIGER.version}: liger_fused_linear_cross_entropy (log-prob only, summed)",
                True,
                fused or cfg.needs(module="liger_kernel"),
            ),
            Impl(
                "cce",
                lambda x: (B.cce_linear_logprob_sum(*flat(x)),),
                f"{B.CCE.project} {B.CCE.version}: linear_cross_entropy, filter_eps=None (log-prob only, summed)",
                True,
                fused or cfg.needs(module="cut_cross_entropy"),
            ),
        ]
        cases.append(
            Case(
                op="linear_logprobs",
                shape=f"N={n} H={h} V={v}",
                dtype=dtype,
                device=cfg.device,
                make_inputs=make,
                impls=impls,
                work=work,
                grads=("hidden", "weight"),
                compared=2,
            )
        )
    return cases
