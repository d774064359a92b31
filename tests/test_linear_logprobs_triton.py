"""The fused hidden-state -> log-prob/entropy Triton kernels (fastppo.kernels.linear_logprobs) against
a float64 reference written plainly here: forward and the gradients of hidden, weight and bias from
both outputs, by the project's tolerance rule. Under Triton's interpreter on CPU tensors, or compiled
on the GPU (``FASTPPO_TEST_CUDA=1`` on a GPU machine: the references stay on the CPU)."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo._backend import interpreting
from fastppo.kernels import linear_logprobs as K
from fastppo.kernels._testing import launch_overrides, record_launches
from tests._tol import assert_within_rule

DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def plain(hidden, weight, bias, y, temperature, ignore_index, dtype):
    """log_softmax(hidden @ weight.T + bias) / T gathered at y, and -sum p log p, all in ``dtype``."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    lsm = torch.log_softmax(z / temperature, dim=-1)
    valid = y != ignore_index
    lp = lsm.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm.clamp(min=-1e4)).sum(-1)  # clamp: 0 * log 0 = 0 for a -inf bias
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def make(N, H, V, dtype, bias=True, ignored=(), ignore_index=-100):
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * 2 / H**0.5).to(dtype)
    # A ramp puts each row's largest logits in the last (partial) vocabulary block: the running max
    # must be rescaled, and the tail masked correctly.
    b = (torch.randn(V) + torch.linspace(0, 3, V)).to(dtype) if bias else None
    y = torch.randint(0, V, (N,))
    y[-1] = V - 1  # a label in the last column of the tail block
    for i in ignored:
        y[i] = ignore_index
    return hidden, weight, b, y


def check(
    hidden,
    weight,
    bias,
    y,
    *,
    view=lambda t: t,
    temperature=1.0,
    ignore_index=-100,
    entropy=True,
    use=("lp", "ent"),
    need=(True, True, True),
):
    """Run the kernel on leaf copies, compare outputs and every gradient with fp64 by the tolerance rule."""
    dtype = hidden.dtype
    leaves = {}
    for name, dt in (("ours", dtype), ("ref", torch.float64), ("same", dtype)):
        dev = DEV if name == "ours" else "cpu"
        leaves[name] = [
            None if t is None else t.detach().to(dev, dt).clone().requires_grad_(r)
            for t, r in zip((hidden, weight, bias), need)
        ]
    h, w, b = leaves["ours"]
    lp, ent = K.linear_logprobs_and_entropy_triton(
        view(h), w, y.to(DEV), b, temperature=temperature, ignore_index=ignore_index, entropy=entropy
    )
    assert lp.dtype == torch.float32 and lp.shape == y.shape
    assert (ent is None) == (not entropy)
    outs = {"ours": (lp, ent)}
    for name in ("ref", "same"):
        hh, ww, bb = leaves[name]
        outs[name] = plain(view(hh), ww, bb, y, temperature, ignore_index, hh.dtype)

    g_lp = torch.randn(y.shape, dtype=torch.float64)
    g_ent = torch.randn(y.shape, dtype=torch.float64)
    for a, e in outs.values():
        loss = 0.0
        if "lp" in use:
            loss = loss + (a * g_lp.to(a.device, a.dtype)).sum()
        if "ent" in use and entropy:
            loss = loss + (e * g_ent.to(e.device, e.dtype)).sum()
        loss.backward()

    lp64, ent64 = outs["ref"]
    assert_within_rule(lp, outs["same"][0], lp64, atol=2e-5 * max(1.0, lp64.abs().max().item()), name="logprobs")
    if entropy:
        assert_within_rule(ent, outs["same"][1], ent64, atol=2e-5 * max(1.0, ent64.abs().max().item()), name="entropy")
    for i, gname in enumerate(("hidden", "weight", "bias")):
        ours, same, ref = (leaves[k][i] for k in ("ours", "same", "ref"))
        if ours is None or not need[i]:
            continue
        assert ours.grad is not None and ours.grad.dtype == dtype and ours.grad.shape == ours.shape, gname
        # float32: lse's ~|lse| eps error reaches every p; half types: dlogits and the result are
        # rounded to the input dtype (as torch does), a few ulps of the largest gradient.
        atol = (32 if dtype == torch.float32 else 4) * EPS[dtype] * ref.grad.abs().max().item() + 1e-12
        assert_within_rule(ours.grad, same.grad, ref.grad, atol=atol, name=f"grad {gname}")
    return lp, ent, leaves["ours"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_temperature_large_logits(dtype):
    # |lse| in the hundreds: log p must be (z - m) - log s in the backward, not z - lse (see _lse.py).
    torch.manual_seed(0)
    hidden, weight, b, y = make(64, 64, 1000, dtype)
    check(hidden * 10, weight, b, y, temperature=0.05, use=("ent",))
    check(hidden * 10, weight, b, y, temperature=0.05)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64(dtype, bias):
    # V, H, N not multiples of the blocks; rows of hidden strided (a column slice of a wider tensor).
    N, H, V = 37, 45, 1000
    hidden, weight, b, y = make(N, H, V, dtype, bias=bias, ignored=(3, 20))
    wide = torch.cat([torch.randn(N, 3).to(dtype), hidden, torch.randn(N, 4).to(dtype)], dim=1)
    with record_launches() as launches:
        check(wide, weight, b, y, view=lambda t: t[:, 3 : 3 + H], temperature=0.7)
    assert launches["fwd"]["HAS_BIAS"] is bias and launches["fwd"]["ENTROPY"] is True
    assert launches["fwd"]["ALIGNED"] is False  # H = 45


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_aligned(dtype):
    # H = 48 and contiguous rows: the ALIGNED variant (vectorization hints on the GPU).
    hidden, weight, b, y = make(21, 48, 700, dtype, ignored=(1,))
    with record_launches() as launches:
        check(hidden, weight, b, y, temperature=1.2)
    assert launches["fwd"]["ALIGNED"] is True and launches["bwd"]["ALIGNED"] is True


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_splits_and_backward_chunks(dtype):
    # 3 forward splits (merged by the combine kernel) and 5 backward chunks (d hidden accumulated in
    # hi/lo halves across them: first, middle and last variants), with ignore_index = 5.
    hidden, weight, b, y = make(20, 40, 1100, dtype, ignored=(0, 7), ignore_index=5)
    with launch_overrides(splits=3, vocab_chunk=256), record_launches() as launches:
        check(hidden, weight, b, y, temperature=1.3, ignore_index=5)
    assert launches["fwd"]["splits"] == 3
    assert launches["bwd"]["chunks"] == 5


@pytest.mark.parametrize("dtype,aligned", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False)])
def test_gpu_tiles(dtype, aligned, monkeypatch):
    # The GPU configurations' tiles (up to 128 x 128) on shapes smaller than one tile, with several
    # backward chunks; H = 80 passes ``is_aligned``, H = 70 does not (the fallback tiles).
    cfg = K.GPU_CONFIGS[("32" if dtype == torch.float32 else "16", aligned)]
    monkeypatch.setattr(K, "config_for", lambda _dtype, _aligned: cfg)
    hidden, weight, b, y = make(9, 80 if aligned else 70, 300, dtype, ignored=(4,))
    with launch_overrides(vocab_chunk=128), record_launches() as launches:
        check(hidden, weight, b, y, temperature=0.8)
    assert launches["fwd"]["BLOCK_V"] == cfg.fwd.BLOCK_V and launches["bwd"]["chunks"] == 3
    assert launches["fwd"]["ALIGNED"] is aligned and launches["bwd"]["ALIGNED"] is aligned


@pytest.mark.parametrize("V,N,dtype", [(50257, 2, torch.bfloat16), (151936 + 5, 1, torch.float32)])
def test_large_vocab(V, N, dtype):
    # verl#2656 shipped a kernel assuming V % tile == 0 (off by +123): large vocabularies whose last
    # block is partial (50257 = 196 x 256 + 81; 151941 = 593 x 256 + 133), label in that block.
    hidden, weight, b, y = make(N, 16, V, dtype, bias=False)
    check(hidden, weight, b, y, temperature=1.1)


def test_single_row():
    hidden, weight, b, y = make(1, 17, 1000, torch.float32)
    check(hidden, weight, b, y)


def test_transposed_hidden():
    # Unit stride along N instead of H: the launcher copies once to a layout the kernels address.
    hidden, weight, b, y = make(12, 33, 200, torch.float32)
    check(hidden.T.contiguous(), weight, b, y, view=lambda t: t.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_false(dtype):
    hidden, weight, b, y = make(11, 40, 500, dtype, ignored=(2,))
    with record_launches() as launches:
        check(hidden, weight, b, y, entropy=False, temperature=0.9)
    assert launches["fwd"]["ENTROPY"] is False and launches["bwd"]["ENTROPY"] is False


def test_unused_outputs():
    hidden, weight, b, y = make(11, 24, 300, torch.float32)
    with record_launches() as launches:
        # Only the log-probs reach the loss: the backward runs the variant without the entropy term.
        check(hidden, weight, b, y, use=("lp",))
        assert launches["fwd"]["ENTROPY"] is True and launches["bwd"]["ENTROPY"] is False
        # Only the entropy: g_lp is None inside the backward.
        check(hidden, weight, b, y, use=("ent",))
        assert launches["bwd"]["ENTROPY"] is True


def test_frozen_weight_and_bias():
    # Only hidden needs a gradient; the frozen bias still enters the recomputed logits.
    hidden, weight, b, y = make(10, 20, 260, torch.bfloat16)
    _, _, (_, w, bb) = check(hidden, weight, b, y, need=(True, False, False))
    assert w.grad is None and bb.grad is None


def test_all_ignored():
    hidden, weight, b, y = make(18, 20, 300, torch.bfloat16)
    y[:] = -100
    h, w, bb = (t.to(DEV).clone().requires_grad_() for t in (hidden, weight, b))
    lp, ent = K.linear_logprobs_and_entropy_triton(h, w, y.to(DEV), bb)
    assert torch.equal(lp.cpu(), torch.zeros(18)) and torch.equal(ent.cpu(), torch.zeros(18))
    (lp * torch.randn(18, device=DEV)).sum().add((ent * torch.randn(18, device=DEV)).sum()).backward()
    for t in (h, w, bb):
        assert torch.equal(t.grad, torch.zeros_like(t)), "ignored rows must give exactly zero gradient"


def test_banned_tokens_neg_inf_bias():
    # -inf bias entries (banned tokens): p = 0 there, finite outputs and gradients.
    hidden, weight, b, y = make(10, 24, 400, torch.float32)
    b[::7] = float("-inf")
    y = (y // 7 * 7 + 1).clamp(max=398)  # no label on a banned token (398 = 7 * 56 + 6)
    check(hidden, weight, b, y, need=(True, True, False))


def test_mixed_dtypes():
    # float32 hidden with a bfloat16 lm_head: computed in float32, each gradient in its input's dtype.
    hidden, weight, b, y = make(8, 32, 300, torch.float32)
    weight = weight.bfloat16()
    h, w = hidden.to(DEV).clone().requires_grad_(), weight.to(DEV).clone().requires_grad_()
    lp, ent = K.linear_logprobs_and_entropy_triton(h, w, y.to(DEV), b.to(DEV))
    (lp.sum() + ent.sum()).backward()
    lp, h, w = lp.cpu(), h.grad.cpu(), w.grad.cpu()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64, ent64 = plain(h64, w64, b.double(), y, 1.0, -100, torch.float64)
    (lp64.sum() + ent64.sum()).backward()
    assert h.dtype == torch.float32 and w.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.double(), h64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.double(), w64.grad, rtol=2**-8, atol=1e-4)


def test_empty_and_float64():
    h = torch.randn(0, 8, device=DEV, requires_grad=True)
    lp, ent = K.linear_logprobs_and_entropy_triton(
        h, torch.randn(5, 8, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV)
    )
    assert lp.shape == ent.shape == (0,)
    lp.sum().backward()
    with pytest.raises(TypeError, match="float64"):
        K.linear_logprobs_and_entropy_triton(
            torch.randn(2, 8, dtype=torch.float64), torch.randn(5, 8), torch.zeros(2, dtype=torch.long)
        )


def test_through_public_function():
    # fastppo.linear_logprobs_and_entropy dispatches here under the Triton backend ([B, T, H] input):
    # the same kernels, so the same bits as the direct call.
    hidden, weight, b, y = (t.to(DEV) for t in make(12, 24, 300, torch.bfloat16, ignored=(5,)))
    h = hidden.view(3, 4, 24).clone().requires_grad_()
    with record_launches() as launches, fastppo.use_backend("triton"):
        lp, ent = fastppo.linear_logprobs_and_entropy(h, weight, y.view(3, 4), bias=b, temperature=0.8)
    assert "fwd" in launches and lp.shape == ent.shape == (3, 4)
    (lp.sum() + ent.sum()).backward()
    h2 = hidden.clone().requires_grad_()
    lp2, ent2 = K.linear_logprobs_and_entropy_triton(h2, weight, y, b, temperature=0.8)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.equal(lp.reshape(-1), lp2) and torch.equal(ent.reshape(-1), ent2)
    assert torch.equal(h.grad.reshape(12, 24), h2.grad)


def test_launch_hooks_are_scoped():
    # Overrides nest (None keeps the outer value) and end with their block; so does the recording.
    from fastppo.kernels._testing import NO_HOOKS, current_hooks

    with launch_overrides(splits=2):
        with launch_overrides(vocab_chunk=64), record_launches() as launches:
            hooks = current_hooks()
            assert (hooks.splits, hooks.vocab_chunk, hooks.record) == (2, 64, launches)
        assert current_hooks().vocab_chunk is None and current_hooks().record is None
        assert current_hooks().splits == 2
    assert current_hooks() == NO_HOOKS
    with pytest.raises(ValueError, match="splits"):
        launch_overrides(splits=0)
    with pytest.raises(TypeError, match="vocab_chunk"):
        launch_overrides(vocab_chunk=1.5)
