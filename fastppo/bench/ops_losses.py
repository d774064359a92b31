"""Cases: the PPO policy loss, the value loss and the k3 KL penalty, ours against the TRL,
OpenRLHF and verl code and ``torch.compile`` of our reference, on float32 ``[B, T]`` inputs with
right-padded masks.

Every implementation computes the same thing: token-mean, ``clip = 0.2``, dual clip 3.0 where the
code has one (TRL has none; no token of these inputs reaches it), value clip 0.2, k3 masked. Bytes:
the inputs read once (float32 tensors, the bool mask) and, for ``kl``, the per-token output
written; ``fwd+bwd`` adds the gradient written.
"""

from __future__ import annotations

import torch

import fastppo
from fastppo.bench import baselines as B
from fastppo.bench.cases import BenchConfig, Case, Impl, Work, tensor_bytes
from fastppo.reference import losses as ref

CLIP, DUAL_CLIP, VALUE_CLIP = 0.2, 3.0, 0.2
SHAPES = {"cuda": [(64, 1024), (256, 4096)], "cpu": [(64, 1024), (256, 4096)], "quick": [(16, 256)]}


def make_inputs(b: int, t: int, device: str) -> dict:
    """Log-probs, advantages, values, returns ``[b, t]`` float32; ``mask`` bool, ``maskf`` float32."""
    g = torch.Generator().manual_seed(0)
    lp = -3.0 * torch.rand(b, t, generator=g)
    x = {
        "lp": lp,
        "old": lp + 0.1 * torch.randn(b, t, generator=g),
        "ref": lp + 0.1 * torch.randn(b, t, generator=g),
        "adv": torch.randn(b, t, generator=g),
        "v": torch.randn(b, t, generator=g),
        "ret": torch.randn(b, t, generator=g),
    }
    x["oldv"] = x["v"] + 0.3 * torch.randn(b, t, generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    x["mask"] = torch.arange(t)[None, :] < lengths[:, None]
    x = {k: v.to(device) for k, v in x.items()}
    x["maskf"] = x["mask"].float()
    for k in ("lp", "v"):
        x[k].requires_grad_()
    return x


def _ours(op, backend: str, **fixed):
    def fn(**kw):
        with fastppo.use_backend(backend):
            return op(**kw, **fixed)

    return fn


def _fastppo(cfg: BenchConfig, call) -> list[Impl]:
    """Our two paths and ``torch.compile`` of the reference; ``call(fn_or_backend, x)`` runs one."""
    return [
        Impl("fastppo-triton", lambda x: call("triton", x), "fastppo Triton kernel", False, cfg.needs(cuda=True)),
        Impl("fastppo-torch", lambda x: call("torch", x), "fastppo PyTorch reference", False),
        Impl(
            "torch.compile(ref)",
            lambda x: call("compiled", x),
            "torch.compile of fastppo's PyTorch reference",
            True,
            cfg.needs(compile=True),
        ),
    ]


def _policy(which, x):
    if which == "compiled":
        loss, _ = B.compiled(ref.policy_loss)(
            x["lp"], x["old"], x["adv"], x["mask"], clip_low=CLIP, dual_clip=DUAL_CLIP
        )
        return (loss,)
    loss, _ = _ours(fastppo.policy_loss, which, clip_low=CLIP, dual_clip=DUAL_CLIP)(
        logprobs=x["lp"], old_logprobs=x["old"], advantages=x["adv"], mask=x["mask"]
    )
    return (loss,)


def _value(which, x):
    if which == "compiled":
        return (B.compiled(ref.value_loss)(x["v"], x["oldv"], x["ret"], x["mask"], clip=VALUE_CLIP)[0],)
    loss, _ = _ours(fastppo.value_loss, which, clip=VALUE_CLIP)(
        values=x["v"], old_values=x["oldv"], returns=x["ret"], mask=x["mask"]
    )
    return (loss,)


def _kl(which, x):
    if which == "compiled":
        return (B.compiled(ref.kl_penalty)(x["lp"], x["ref"], kind="k3", mask=x["mask"]),)
    return (_ours(fastppo.kl_penalty, which, kind="k3")(logprobs=x["lp"], ref_logprobs=x["ref"], mask=x["mask"]),)


def _baselines(op: str) -> list[Impl]:
    s = B.SOURCES
    if op == "policy_loss":
        return [
            Impl(
                "trl",
                lambda x: B.trl_policy_loss(x["lp"], x["old"], x["adv"], x["mask"], CLIP),
                str(s["trl_policy_loss"]),
                True,
            ),
            Impl(
                "openrlhf",
                lambda x: B.openrlhf_policy_loss(x["lp"], x["old"], x["adv"], x["maskf"], CLIP, CLIP, DUAL_CLIP),
                str(s["openrlhf_policy_loss"]),
                True,
            ),
            Impl(
                "verl",
                lambda x: B.verl_policy_loss(x["old"], x["lp"], x["adv"], x["maskf"], CLIP, clip_ratio_c=DUAL_CLIP),
                f"{s['verl_policy_loss']} (with its three .item() metric reads)",
                True,
            ),
        ]
    if op == "value_loss":
        return [
            Impl(
                "trl",
                lambda x: B.trl_value_loss(x["v"], x["oldv"], x["ret"], x["mask"], VALUE_CLIP),
                str(s["trl_value_loss"]),
                True,
            ),
            Impl(
                "openrlhf",
                lambda x: (B.openrlhf_value_loss(x["v"], x["oldv"], x["ret"], x["maskf"], VALUE_CLIP),),
                str(s["openrlhf_value_loss"]),
                True,
            ),
            Impl(
                "verl",
                lambda x: B.verl_value_loss(x["v"], x["ret"], x["oldv"], x["maskf"], VALUE_CLIP),
                str(s["verl_value_loss"]),
                True,
            ),
        ]
    # kl: each library's per-token k3, masked as its loss aggregation masks it
    return [
        Impl("trl", lambda x: (B.trl_kl_k3(x["lp"], x["ref"]) * x["maskf"],), str(s["trl_kl_k3"]), True),
        Impl(
            "openrlhf",
            lambda x: (B.openrlhf_compute_approx_kl(x["lp"], x["ref"], "k3") * x["maskf"],),
            str(s["openrlhf_compute_approx_kl"]),
            True,
        ),
        Impl(
            "verl",
            lambda x: (B.verl_kl_penalty_k3(x["lp"], x["ref"]) * x["maskf"],),
            str(s["verl_kl_penalty_k3"]),
            True,
        ),
    ]


_OPS = {  # op: (our call, inputs read, differentiated input, per-token output)
    "policy_loss": (_policy, ("lp", "old", "adv", "mask"), "lp", False),
    "value_loss": (_value, ("v", "oldv", "ret", "mask"), "v", False),
    "kl": (_kl, ("lp", "ref", "mask"), "lp", True),
}


def loss_cases(op: str, cfg: BenchConfig) -> list[Case]:
    """The cases of ``op``: ``"policy_loss"``, ``"value_loss"`` or ``"kl"``."""
    call, reads, grad, per_token = _OPS[op]
    cases = []
    for b, t in SHAPES["quick" if cfg.quick else cfg.device]:

        def work(x, pass_, reads=reads, grad=grad, per_token=per_token):
            n = tensor_bytes(*(x[k] for k in reads))
            if per_token:
                n += tensor_bytes(x[grad])  # the float32 output, as large as an input
            if pass_ == "fwd+bwd":
                n += tensor_bytes(x[grad])
            return Work(n, "GB/s", "copy_gbs")

        cases.append(
            Case(
                op=op,
                shape=f"B={b} T={t}",
                dtype="float32",
                device=cfg.device,
                make_inputs=lambda b=b, t=t: make_inputs(b, t, cfg.device),
                impls=[*_fastppo(cfg, call), *_baselines(op)],
                work=work,
                grads=(grad,),
                objective=lambda out: out[0].sum(),
                valid="mask",
            )
        )
    return cases
