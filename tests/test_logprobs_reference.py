"""The chunked PyTorch references: logits path (chunking, gradcheck) and the hidden-state (linear) path."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import fastppo
import fastppo.reference.logprobs as R
from tests.test_logprobs import plain_logprobs_entropy, to_kernel_device


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of a few rows, so that every branch of the chunk loop runs on small tensors."""
    monkeypatch.setattr(R, "CHUNK_BYTES", 3 * 16 * 8)  # 3 rows of V=16 in float64, 6 in float32
    return R


def test_chunk_rows_bound():
    assert R.chunk_rows(151936, torch.float32) * 151936 * 4 <= R.CHUNK_BYTES
    assert R.chunk_rows(151936, torch.float32) >= 32
    assert R.chunk_rows(10**9, torch.float32) == 1


@pytest.mark.parametrize(
    "shape,view",
    [
        ((4, 9, 16), lambda t: t[:, :-1]),  # T = 8 > rows per chunk: chunks inside each sequence
        ((9, 2, 16), lambda t: t[:, :-1]),  # T = 1 <= rows per chunk: several sequences per chunk
        ((23, 16), lambda t: t),  # 2-D, one row stride
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_matches_plain(tiny_chunks, shape, view, inplace):
    base = torch.randn(*shape, dtype=torch.float64)
    lead = view(base).shape[:-1]
    y = torch.randint(0, 16, lead)
    y.view(-1)[::5] = -100
    g_lp, g_ent = torch.randn(lead, dtype=torch.float64), torch.randn(lead, dtype=torch.float64)
    grads = []
    for fn in ("ours", "plain"):
        b = base.clone().requires_grad_()
        x = view(b * 1.0)  # a non-leaf, so that an in-place backward may take its buffer
        with fastppo.use_backend("torch"):
            if fn == "ours":
                lp, ent = fastppo.logprobs_and_entropy(x, y, temperature=1.7, inplace_backward=inplace)
            else:
                lp, ent = plain_logprobs_entropy(x, y, 1.7, dtype=torch.float64)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        grads.append((lp.detach(), ent.detach(), b.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_reference():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, -100, 3])

    def f(x, entropy=True, inplace=False):
        lp, ent = R.logprobs_and_entropy_torch(x * 1.0, y, temperature=0.6, entropy=entropy, inplace_backward=inplace)
        return (lp, ent) if entropy else lp

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradcheck(lambda x: f(x, entropy=False), (x,))

    # In place, the logits are consumed by the first backward: a second one is an error, not a wrong answer.
    lp, ent = f(x, inplace=True)
    (lp.sum() + ent.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + ent.sum()).backward()


def test_forward_never_holds_full_float32_copy(tiny_chunks):
    # Only per-row statistics are saved: the logits themselves, labels, [N] vectors and the [2, N]
    # row max / log-sum; nothing of size N x V (V = 16 > 2 here, so a chunk copy would show).
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    lp, _ent = R.logprobs_and_entropy_torch(x, torch.randint(0, 16, (10,)))
    saved = lp.grad_fn.saved_tensors
    assert saved[0] is x or saved[0].data_ptr() == x.data_ptr()
    assert all(t.numel() in (10, 20) for t in saved[1:] if t is not None)


# --- the hidden-state path ---------------------------------------------------------------------


def plain_linear(h, w, b, y, temperature=1.0, ignore_index=-100, dtype=torch.float64):
    logits = h.to(dtype) @ w.to(dtype).T
    if b is not None:
        logits = logits + b.to(dtype)
    return plain_logprobs_entropy(logits, y, temperature, ignore_index, dtype=dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy", [True, False])
def test_linear_matches_fp64(tiny_chunks, bias, entropy):
    # 3-D hidden, ignored positions, temperature, chunks of a few tokens (V = 16 here).
    torch.manual_seed(3)
    h = torch.randn(3, 5, 8)
    w = torch.randn(16, 8)
    b = torch.randn(16) if bias else None
    y = torch.randint(0, 16, (3, 5))
    y[0, :2] = -100
    g_lp, g_ent = torch.randn(3, 5), torch.randn(3, 5)
    outs = []
    for ours in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if bias else None
        if ours:
            with fastppo.use_backend("torch"):
                lp, ent = fastppo.linear_logprobs_and_entropy(hh, ww, y, bias=bb, temperature=0.8, entropy=entropy)
            assert lp.dtype == torch.float32 and lp.shape == (3, 5) and (ent is None) == (not entropy)
        else:
            lp, ent = plain_linear(hh, ww, bb, y, 0.8)
            ent = ent if entropy else None
        loss = (lp * g_lp.to(lp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if entropy else 0)
        loss.backward()
        outs.append([lp, ent, hh.grad, ww.grad, bb.grad if bias else None])
    for name, a, r in zip(("logprobs", "entropy", "d hidden", "d weight", "d bias"), *outs):
        if r is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5, msg=name)
    assert (outs[0][0][0, :2] == 0).all() and (outs[0][2][0, :2] == 0).all()


def test_linear_bf16_inputs():
    h = torch.randn(6, 32).bfloat16().requires_grad_()
    w = (torch.randn(50, 32) / 4).bfloat16().requires_grad_()
    y = torch.randint(0, 50, (6,))
    lp, ent = fastppo.linear_logprobs_and_entropy(h, w, y)
    (lp.sum() + ent.sum()).backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    lp64, ent64 = plain_linear(h.detach(), w.detach(), None, y)
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=1e-4)


def test_linear_gradcheck():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, -100, 3, 2])
    f = lambda h, w, b: R.linear_logprobs_and_entropy_torch(h, w, y, b, temperature=1.3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w, b))
    g = lambda h, w: R.linear_logprobs_and_entropy_torch(h, w, y, None, entropy=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(g, (h, w))


def test_linear_agrees_with_logits_path():
    h = torch.randn(2, 4, 12, dtype=torch.float64)
    w = torch.randn(30, 12, dtype=torch.float64)
    y = torch.randint(0, 30, (2, 4))
    a = fastppo.linear_logprobs_and_entropy(h, w, y, temperature=0.5)
    b = fastppo.logprobs_and_entropy(h @ w.T, y, temperature=0.5)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_linear_dispatches_to_triton_interface(monkeypatch):
    """On the Triton path the public function calls the fused kernel module with the agreed signature."""
    calls = {}

    def fake(hidden2d, weight, labels1d, bias, *, temperature, ignore_index, entropy):
        calls.update(
            hidden=hidden2d.shape,
            labels=(labels1d.shape, labels1d.dtype),
            bias=bias,
            t=temperature,
            ig=ignore_index,
            ent=entropy,
        )
        n, dev = hidden2d.shape[0], hidden2d.device
        return torch.zeros(n, device=dev), (torch.ones(n, device=dev) if entropy else None)

    mod = types.ModuleType("fastppo.kernels.linear_logprobs")
    mod.linear_logprobs_and_entropy_triton = fake
    monkeypatch.setitem(sys.modules, "fastppo.kernels.linear_logprobs", mod)
    h, w = torch.randn(2, 3, 4)[:, 1:], torch.randn(9, 4)
    y = torch.randint(0, 9, (2, 2), dtype=torch.int32)
    # Compiled (GPU) mode: the Triton backend refuses CPU tensors, so the inputs go where it runs.
    h, w, y = (to_kernel_device(t) for t in (h, w, y))
    with fastppo.use_backend("triton"):
        lp, ent = fastppo.linear_logprobs_and_entropy(h, w, y, temperature=0.5, ignore_index=-1)
    assert calls == dict(hidden=(4, 4), labels=((4,), torch.int64), bias=None, t=0.5, ig=-1, ent=True)
    assert lp.shape == ent.shape == (2, 2)


def test_linear_bad_inputs():
    h, w, y = torch.randn(2, 3, 4), torch.randn(9, 4), torch.randint(0, 9, (2, 3))
    f = fastppo.linear_logprobs_and_entropy
    with pytest.raises(ValueError, match="weight"):
        f(h, torch.randn(9, 5), y)
    with pytest.raises(ValueError, match="weight"):
        f(h, torch.randn(9), y)
    with pytest.raises(ValueError, match="bias"):
        f(h, w, y, bias=torch.randn(8))
    with pytest.raises(TypeError, match="hidden"):
        f(h.long(), w, y)
    with pytest.raises(ValueError, match="labels"):
        f(h, w, y[:, :2])
    with pytest.raises(TypeError, match="labels"):
        f(h, w, y.float())
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        f(h, w, y + 9)
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="device"):
        f(h, w.to("meta"), y)
