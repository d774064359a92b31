"""fastppo.logprobs_and_entropy on both backends (Triton, and the torch path) against a float64
reference written plainly here; the kernel's variants, batch invariance, errors.

The Triton backend runs under Triton's interpreter on CPU tensors, or compiled on CUDA tensors when the
suite runs with ``FASTPPO_TEST_CUDA=1`` on a GPU machine (:data:`KDEV`). References always stay on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo._backend import interpreting
from tests._tol import assert_within_rule

BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# Where the Triton backend runs: compiled kernels (no interpreter) only take CUDA tensors.
KDEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def to_kernel_device(t: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """``t`` (detached) on the device ``backend`` runs on, with the same values *and strides*: a strided
    view (``x[:, :-1]``, ``y[::2]``) stays a view of a copy of its whole storage span. Identity on the CPU."""
    dev = KDEV if backend == "triton" else "cpu"
    if t.device.type == dev:
        return t.detach()
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
    flat = t.detach().as_strided((span,), (1,), t.storage_offset()).to(dev)
    return flat.as_strided(t.shape, t.stride())


def kernel_leaf(t: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """A fresh leaf (requires grad) holding ``t``'s values on the device ``backend`` runs on."""
    return to_kernel_device(t, backend).clone().requires_grad_()


def plain_logprobs_entropy(x, y, temperature=1.0, ignore_index=-100, dtype=None):
    """log_softmax + gather and -sum p log p, computed in ``dtype`` (float64 for the ground truth)."""
    z = x.to(dtype) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    valid = y != ignore_index
    lp = lsm.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def check_case(backend, base, y, view=lambda t: t, temperature=1.0, ignore_index=-100, entropy=True, atol=2e-5):
    """Forward and gradients of ``logprobs_and_entropy(view(base), y)`` against fp64, by the tolerance rule."""
    dtype = base.dtype
    ours_base = kernel_leaf(base, backend)  # the view is taken on the device copy: still strided there
    with fastppo.use_backend(backend):
        lp, ent = fastppo.logprobs_and_entropy(
            view(ours_base),
            to_kernel_device(y, backend),
            temperature=temperature,
            ignore_index=ignore_index,
            entropy=entropy,
        )
    assert lp.dtype == torch.float32 and lp.shape == y.shape and lp.device == ours_base.device
    assert (ent is None) == (not entropy)

    results = {}
    for name, dt in (("ref", torch.float64), ("same", dtype)):
        b = base.detach().clone().to(dt if name == "ref" else dtype).requires_grad_()
        results[name] = (b, *plain_logprobs_entropy(view(b), y, temperature, ignore_index, dtype=dt))
    g_lp = torch.randn(y.shape, dtype=torch.float64)
    g_ent = torch.randn(y.shape, dtype=torch.float64)

    loss = (lp * g_lp.float().to(lp.device)).sum() + ((ent * g_ent.float().to(lp.device)).sum() if entropy else 0)
    loss.backward()
    lp, ent, grad = lp.detach().cpu(), (ent.detach().cpu() if entropy else None), ours_base.grad.cpu()
    for _b, lp_r, ent_r in results.values():
        loss_r = (lp_r * g_lp.to(lp_r.dtype)).sum() + ((ent_r * g_ent.to(ent_r.dtype)).sum() if entropy else 0)
        loss_r.backward()

    _, lp64, ent64 = results["ref"]
    _, lp_same, ent_same = results["same"]
    assert_within_rule(lp, lp_same, lp64, atol=atol * max(1.0, lp64.abs().max().item()), name="logprobs")
    if entropy:
        assert_within_rule(ent, ent_same, ent64, atol=atol * max(1.0, ent64.abs().max().item()), name="entropy")
    grad64 = results["ref"][0].grad
    assert grad.dtype == dtype
    # float32: the fp32 logsumexp carries ~|lse| * eps absolute error into every p, a few tens of ulps of
    # the largest gradient; half types: the final rounding to the logits' dtype dominates.
    g_atol = (32 if dtype == torch.float32 else 4) * EPS[dtype] * grad64.abs().max().item() + 1e-12
    assert_within_rule(grad, results["same"][0].grad, grad64, atol=g_atol, name="grad logits")
    return lp, ent, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_temperature_large_logits(backend, dtype):
    # |lse| in the hundreds (logits ~ 10 at T = 0.05): the backward must not compute log p as z - lse,
    # whose rounding (an ulp of |lse|) the exactly computed entropy does not cancel: that makes the
    # entropy gradient up to 60x less accurate than torch's.
    torch.manual_seed(0)
    base = (torch.randn(64, 1000) * 10).to(dtype)
    check_case(backend, base, torch.randint(0, 1000, (64,)), temperature=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 5, 100, 1000, 5003])
def test_matches_fp64(backend, dtype, V):
    # 3-D, non-contiguous rows (logits[:, :-1] of [B, L, V]), temperature != 1, one ignored position.
    base = (torch.randn(2, 4, V) * 3 + torch.linspace(0, 4, V)).to(dtype)  # largest logits in the last block
    y = torch.randint(0, V, (2, 3))
    y[1, 0] = -100
    check_case(backend, base, y, view=lambda t: t[:, :-1], temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,dtype", [(50257, torch.float32), (151936, torch.bfloat16), (151936, torch.float16)])
def test_large_vocab(backend, V, dtype):
    base = (torch.randn(2, V) * 4).to(dtype)
    y = torch.tensor([3, V - 1])
    check_case(backend, base, y, temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_1d(backend):
    V = 4100  # just past the largest block: a one-column tail block
    base = torch.randn(1, V)
    check_case(backend, base, torch.tensor([V - 1]))
    check_case(backend, torch.randn(V), torch.tensor(7))  # logits [V], labels []


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_2d(backend):
    # Rows with a stride larger than V (a column slice of a wider tensor), read without a copy.
    base = torch.randn(5, 130)
    check_case(backend, base, torch.randint(0, 97, (5,)), view=lambda t: t[:, 20:117], temperature=2.0)
    check_case(backend, base, torch.randint(0, 97, (10,))[::2], view=lambda t: t[:, 20:117])  # strided labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_single_view_falls_back(backend):
    # [2, 3, 4, V] sliced on two leading dims: no [O, T, V] view exists, the public function copies once.
    base = torch.randn(2, 3, 5, 33)
    check_case(backend, base, torch.randint(0, 33, (2, 2, 4)), view=lambda t: t[:, 1:, :-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [300, 9000])
def test_entropy_false(backend, V):
    # A ramp puts each row's maximum in its last block: the running max must be rescaled.
    base = torch.randn(2, 3, V) + torch.linspace(0, 6, V)
    y = torch.randint(0, V, (2, 3))
    check_case(backend, base, y, entropy=False, temperature=0.9)
    check_case(backend, base.flip(-1), y, entropy=False, temperature=0.9)


def test_entropy_flag_selects_kernel_variant():
    from fastppo.kernels._testing import record_launches

    x = kernel_leaf(torch.randn(4, 70))
    y = to_kernel_device(torch.randint(0, 70, (4,)))
    with record_launches() as launches, fastppo.use_backend("triton"):
        for flag in (False, True):
            lp, ent = fastppo.logprobs_and_entropy(x, y, entropy=flag)
            assert launches["fwd"]["COMPUTE_ENTROPY"] is flag
            (lp.sum() + (ent.sum() if flag else 0)).backward()
            assert launches["bwd"]["COMPUTE_ENTROPY"] is flag
    assert launches["fwd"]["BLOCK_V"] == 128 and launches["fwd"]["ROWS"] == 8
    # entropy computed but left out of the loss: the backward needs no entropy term
    with record_launches() as launches, fastppo.use_backend("triton"):
        lp, ent = fastppo.logprobs_and_entropy(x, y)
        lp.sum().backward()
    assert launches["fwd"]["COMPUTE_ENTROPY"] is True and launches["bwd"]["COMPUTE_ENTROPY"] is False


def test_launch_config_depends_only_on_vocab():
    from fastppo.kernels.logprobs import MAX_BLOCK_V, launch_config

    assert launch_config(151936)["BLOCK_V"] == MAX_BLOCK_V and launch_config(151936)["ROWS"] == 1
    assert launch_config(5) == launch_config(64)
    for V in (1, 5, 100, 1000, 5003, 151936):
        cfg = launch_config(V)
        assert cfg["BLOCK_V"] * cfg["ROWS"] >= min(V, 1024)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignore_index(backend, dtype):
    base = torch.randn(4, 50).to(dtype)
    y = torch.tensor([-100, 3, -100, 7])
    lp, ent, grad = check_case(backend, base, y)
    assert lp[0] == 0 and lp[2] == 0 and ent[0] == 0 and ent[2] == 0
    assert (grad[0] == 0).all() and (grad[2] == 0).all() and (grad[1] != 0).any()
    # a custom ignore_index value, inside the vocabulary range
    check_case(backend, base, torch.tensor([0, 3, 0, 7]), ignore_index=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_from_one_output_only(backend):
    base = torch.randn(4, 6, 77)
    y = torch.randint(0, 77, (4, 6))
    x = kernel_leaf(base, backend)
    x64 = base.double().requires_grad_()
    with fastppo.use_backend(backend):
        _lp, ent = fastppo.logprobs_and_entropy(x, to_kernel_device(y, backend), temperature=1.5)
    ent.sum().backward()  # logprobs unused: its gradient is None inside the backward
    plain_logprobs_entropy(x64, y, 1.5, dtype=torch.float64)[1].sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros(backend):
    x = kernel_leaf(torch.randn(3, 40) * 100, backend)
    y = to_kernel_device(torch.full((3,), -100), backend)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.logprobs_and_entropy(x, y, temperature=0.5)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_entries(backend):
    # -inf logits (banned tokens): finite outputs, zero gradient on those entries.
    x_cpu = torch.randn(3, 20)
    x_cpu[:, 5:9] = float("-inf")
    y_cpu = torch.tensor([0, 10, 19])
    x, y = kernel_leaf(x_cpu, backend), to_kernel_device(y_cpu, backend)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.logprobs_and_entropy(x, y)
    (lp.sum() + ent.sum()).backward()
    lp64, _ = plain_logprobs_entropy(x_cpu, y_cpu, dtype=torch.float64)
    lsm = torch.log_softmax(x_cpu.double(), -1)
    ent64 = -torch.where(torch.isinf(lsm), 0.0, lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(lp.cpu().double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ent64, rtol=0, atol=1e-5)
    assert torch.isfinite(x.grad).all() and (x.grad[:, 5:9] == 0).all()
    with fastppo.use_backend(backend):
        lp_only, none = fastppo.logprobs_and_entropy(x, y, entropy=False)
    assert none is None and torch.equal(lp_only, lp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    # logits produced by a matmul (whose backward does not need them), as from an lm_head.
    torch.manual_seed(1)
    h = torch.randn(2, 6, 16).to(dtype)
    w = torch.randn(90, 16).to(dtype)
    y = torch.randint(0, 90, (2, 5))
    y[0, 2] = -100
    h, w, y = (to_kernel_device(t, backend) for t in (h, w, y))  # logits, hence their grad, on that device
    grads = {}
    for inplace in (False, True):
        w_ = w.clone().requires_grad_()
        logits = h @ w_.T
        seen = {}
        logits.register_hook(lambda g, seen=seen: seen.setdefault("g", g))
        with fastppo.use_backend(backend):
            lp, ent = fastppo.logprobs_and_entropy(logits[:, :-1], y, temperature=0.8, inplace_backward=inplace)
        (lp.sum() + 0.5 * ent.sum()).backward()
        grads[inplace] = w_.grad
        assert seen["g"].shape == logits.shape
        if inplace:
            assert not torch.equal(logits.detach(), (h @ w.T)), "the logits buffer should hold the gradient"
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_logits(backend):
    from fastppo.kernels._testing import record_launches

    logits = kernel_leaf(torch.randn(5, 33) * 2, backend)
    y = to_kernel_device(torch.randint(0, 33, (5,)), backend)
    x = logits * 1.0  # a non-leaf whose buffer the backward may take over
    ref = logits.detach().clone().requires_grad_()
    # A backward records its launch where its forward was recorded, wherever autograd runs it.
    with record_launches() as launches, fastppo.use_backend(backend):
        lp, ent = fastppo.logprobs_and_entropy(x, y, inplace_backward=True)
        lp_r, ent_r = fastppo.logprobs_and_entropy(ref, y)
    seen = {}
    x.register_hook(lambda g: seen.setdefault("g", g))
    (lp.sum() - ent.sum()).backward()
    if backend == "triton":
        assert launches["bwd"]["inplace"] is True
    (lp_r.sum() - ent_r.sum()).backward()
    assert seen["g"].data_ptr() == x.data_ptr()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=0, atol=0)
    if backend == "triton":
        assert launches["bwd"]["inplace"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_raises_when_logits_are_saved_elsewhere(backend):
    # Another op saved the logits for its own backward: overwriting them with the gradient would make
    # its gradient wrong. Autograd must raise (version counter), on both backends, never go on silently.
    h = kernel_leaf(torch.randn(4, 8), backend)
    w = to_kernel_device(torch.randn(30, 8), backend)
    y = to_kernel_device(torch.randint(0, 30, (4,)), backend)
    logits = h @ w.T
    squared = (logits * logits).sum()  # MulBackward saves logits
    with fastppo.use_backend(backend):
        lp, _ = fastppo.logprobs_and_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squared).backward()


def test_expanded_logits_inplace_falls_back():
    # Rows that share memory (expand): writing in place would be wrong; a fresh buffer is used instead.
    row_cpu, y_cpu = torch.randn(1, 40), torch.tensor([1, 2, 3])
    for backend in BACKENDS:
        row, y = kernel_leaf(row_cpu, backend), to_kernel_device(y_cpu, backend)
        with fastppo.use_backend(backend):
            lp, _ent = fastppo.logprobs_and_entropy(row.expand(3, 40) * 1.0, y, inplace_backward=True)
            lp.sum().backward()
            g_inplace = row.grad.clone()
            row.grad = None
            x = row.expand(3, 40)
            lp, _ = fastppo.logprobs_and_entropy(x, y, inplace_backward=True)
            lp.sum().backward()
        torch.testing.assert_close(row.grad, g_inplace, rtol=0, atol=0)


@pytest.mark.parametrize("V", [5, 1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_batch_invariance(V, dtype):
    """A row's log-prob, entropy and gradient are bit-identical alone or within any batch."""
    x = (torch.randn(19, V) * 3).to(dtype)
    y = torch.randint(0, V, (19,))
    g_lp, g_ent = torch.randn(19), torch.randn(19)
    x, y, g_lp, g_ent = (to_kernel_device(t) for t in (x, y, g_lp, g_ent))

    def run(idx):
        idx = idx.to(x.device)
        xi = x[idx].clone().requires_grad_()
        with fastppo.use_backend("triton"):
            lp, ent = fastppo.logprobs_and_entropy(xi, y[idx], temperature=0.9)
        (lp * g_lp[idx] + ent * g_ent[idx]).sum().backward()
        return lp.detach(), ent.detach(), xi.grad

    lp, ent, grad = run(torch.arange(19))
    for idx in (torch.tensor([0]), torch.tensor([11]), torch.tensor([18, 3, 7]), torch.arange(5, 19)):
        lp_i, ent_i, grad_i = run(idx)
        assert torch.equal(lp_i, lp[idx]) and torch.equal(ent_i, ent[idx]) and torch.equal(grad_i, grad[idx])


def test_rows3d_reads_slice_without_copy():
    from fastppo._layout import rows3d

    full = torch.randn(2, 5, 7)
    v = rows3d(full[:, :-1])
    assert v.shape == (2, 4, 7) and v.data_ptr() == full.data_ptr()
    assert rows3d(full).shape == (1, 10, 7)
    assert rows3d(full.transpose(1, 2)) is None  # columns not contiguous
    assert rows3d(torch.randn(2, 3, 5, 7)[:, 1:, :-1]) is None


def test_empty_input():
    x = torch.randn(0, 5, requires_grad=True)
    lp, ent = fastppo.logprobs_and_entropy(x, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 5)


def test_float64_stays_float64():
    x = torch.randn(3, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (3,))
    with fastppo.use_backend("triton"):
        lp, ent = fastppo.logprobs_and_entropy(to_kernel_device(x), to_kernel_device(y))
    assert lp.dtype == ent.dtype == torch.float64
    lp64, ent64 = plain_logprobs_entropy(x, y, dtype=torch.float64)
    torch.testing.assert_close(lp.cpu(), lp64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent.cpu(), ent64, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    x = torch.randn(2, 3, 10)
    y = torch.randint(0, 10, (2, 3))
    f = fastppo.logprobs_and_entropy
    with pytest.raises(ValueError, match="labels"):
        f(x, y[:, :2])
    with pytest.raises(TypeError, match="labels"):
        f(x, y.float())
    with pytest.raises(TypeError, match="labels"):
        f(x, y > 0)
    with pytest.raises(TypeError, match="logits"):
        f(x.long(), y)
    with pytest.raises(TypeError, match="logits"):
        f(x.tolist(), y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        f(x, torch.where(y == y[0, 0], 10, y))
    with pytest.raises(ValueError, match="found -1"):
        f(x, torch.full_like(y, -1))
    for t in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            f(x, y, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        f(x, y, temperature="1")
    with pytest.raises(TypeError, match="ignore_index"):
        f(x, y, ignore_index=1.5)
    with pytest.raises(TypeError, match="entropy"):
        f(x, y, entropy=None)
    with pytest.raises(ValueError, match="V >= 1"):
        f(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="device"):
        f(x, y.to("meta"))
