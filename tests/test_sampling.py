"""Graph-safe sampling helpers (fastppo.sampling): support and frequencies of top-k/top-p sampling,
greedy, log-probs and reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.sampling import filter_top_k_top_p, sample_tokens
from tests._tol import requires_cuda


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def reference_support(logits_row, top_k, top_p):
    """Tokens kept by top-k then top-p, written plainly: a Python loop over the sorted probabilities."""
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k > 0:
        order = order[:top_k]
    z = [math.exp(logits_row[i]) for i in order]
    total = sum(z)
    kept, mass = [], 0.0
    for i, zi in zip(order, z):
        if mass >= top_p and kept:
            break
        kept.append(i)
        mass += zi / total
    return set(kept)


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.95), (10, 0.7), (3, 0.01), (40, 0.999)]
)
def test_filter_support_matches_a_loop_and_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 37, generator=g) * 3
    out = filter_top_k_top_p(logits, t(top_k, torch.int64), t(top_p))
    hf = logits.clone()
    if top_k > 0:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(None, hf)
    for row in range(logits.shape[0]):
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert kept == reference_support(logits[row].tolist(), top_k, top_p)
        assert kept == set(torch.isfinite(hf[row]).nonzero().flatten().tolist())
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])  # kept logits untouched


def test_sampling_frequencies_follow_the_filtered_distribution():
    """20000 seeded draws per setting; every token's count within 5 binomial sigmas of its probability,
    filtered tokens never drawn. Tight enough to catch a wrong temperature or renormalisation."""
    logits = t([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 20000
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 4, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.9)]:
        scaled = logits / temperature
        keep = torch.zeros_like(scaled, dtype=torch.bool)
        keep[list(reference_support(scaled.tolist(), top_k, top_p))] = True
        probs = torch.where(keep, scaled, torch.tensor(float("-inf"))).softmax(-1)
        mode = "filter" if top_k or top_p < 1 else "sample"
        tokens, logprobs = sample_tokens(
            logits.expand(n, -1),
            mode=mode,
            temperature=t(temperature),
            top_k=t(top_k, torch.int64),
            top_p=t(top_p),
            generator=torch.Generator().manual_seed(1),
        )
        counts = torch.bincount(tokens, minlength=logits.numel()).double()
        expected = probs.double() * n
        sigma = (n * probs.double() * (1 - probs.double())).sqrt()
        assert (counts[~keep] == 0).all(), (temperature, top_k, top_p)
        assert ((counts - expected).abs() <= 5 * sigma + 1e-9).all(), (temperature, top_k, top_p, counts, expected)
        # the log-prob is under the temperature-scaled distribution before filtering
        torch.testing.assert_close(logprobs, scaled.log_softmax(-1)[tokens])


def test_greedy_and_logprobs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 50, generator=g).to(torch.bfloat16)
    tokens, logprobs = sample_tokens(logits, mode="greedy", temperature=t(0.7))
    assert torch.equal(tokens, logits.argmax(-1))
    ref = (logits.double() / 0.7).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-6, rtol=1e-6)


def test_top_k_one_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 30, generator=g)
    for k, p in [(1, 1.0), (0, 1e-6)]:
        tokens, _ = sample_tokens(
            logits,
            mode="filter",
            temperature=t(1.3),
            top_k=t(k, torch.int64),
            top_p=t(p),
            generator=torch.Generator().manual_seed(4),
        )
        assert torch.equal(tokens, logits.argmax(-1))


def test_seeded_generator_reproducible():
    logits = torch.randn(16, 100)

    def draw(seed):
        return sample_tokens(logits, mode="sample", temperature=t(1.0), generator=torch.Generator().manual_seed(seed))[
            0
        ]

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_tokens(torch.zeros(1, 3), mode="beam", temperature=t(1.0))


def test_generator_on_another_device_is_a_clear_error():
    # the draws are made on the logits' device: torch's own error for a mismatch names neither argument
    for mode in ("sample", "filter"):
        with pytest.raises(ValueError, match=r"generator is on cpu but logits are on meta"):
            sample_tokens(
                torch.zeros(2, 3, device="meta"),
                mode=mode,
                temperature=t(1.0),
                top_k=t(0, torch.int64),
                top_p=t(1.0),
                generator=torch.Generator(),
            )
    # greedy draws nothing: any generator is fine
    tokens, _ = sample_tokens(t([[0.0, 1.0]]), mode="greedy", temperature=t(1.0), generator=torch.Generator())
    assert tokens.tolist() == [1]


@requires_cuda
def test_cpu_generator_with_cuda_logits_is_a_clear_error():
    logits = torch.randn(2, 5, device="cuda")
    with pytest.raises(ValueError, match=r"generator is on cpu but logits are on cuda:0"):
        sample_tokens(logits, mode="sample", temperature=t(1.0).cuda(), generator=torch.Generator())


@requires_cuda
def test_sampling_captures_in_a_cuda_graph_without_sync():
    dev = "cuda"
    logits = torch.randn(32, 1000, device=dev)
    temperature, top_k, top_p = t(0.9).to(dev), torch.tensor(50, device=dev), t(0.9).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    out = torch.zeros(32, dtype=torch.int64, device=dev)

    def body():
        out.copy_(
            sample_tokens(logits, mode="filter", temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)[0]
        )

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            body()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    draws = []
    for seed in (7, 7, 8):
        gen.manual_seed(seed)
        graph.replay()
        draws.append(out.clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    keep = torch.isfinite(filter_top_k_top_p(logits / 0.9, top_k, top_p))
    assert keep.gather(-1, draws[0][:, None]).all()


def test_top_p_one_removes_nothing():
    # top_p = 1 is "off" even when top-k filtering runs: float32's running mass reaches 1.0 before the
    # last ranks, and that must not cut the tail (thousands of tokens at V = 152k).
    torch.manual_seed(0)
    V = 151936
    x = torch.randn(1, V) * 3
    out = filter_top_k_top_p(x, torch.tensor(V), torch.tensor(1.0))
    assert torch.equal(out, x)
    out = filter_top_k_top_p(x, torch.tensor(1000), torch.tensor(1.0))
    assert int(torch.isfinite(out).sum()) == 1000
    y = t([[0.0, -20.0]])
    assert torch.isfinite(filter_top_k_top_p(y, torch.tensor(2), torch.tensor(1.0))).all()


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0 - 2.0**-53])  # the extremes of torch.rand's float64 draws
def test_cpu_inverse_cdf_never_draws_a_zero_probability_token(monkeypatch, r):
    """The CPU sampler's contract at the ends of the uniform draw: leading, trailing and inner tokens of
    probability 0 (filtered) are never picked, and a probability of 1e-12 still owns its interval."""
    from fastppo import sampling

    probs = t([[0.0, 1e-12, 0.0, 0.5, 0.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.full(shape, r, dtype=kw["dtype"]))
    tokens = sampling._inverse_cdf(probs, None)
    assert probs[torch.arange(2), tokens].gt(0).all(), tokens
    expected = {0.0: [5, 6], 0.5: [3, 6], 1.0 - 2.0**-53: [1, 6]}[r]  # u = (1 - r) * total
    assert tokens.tolist() == expected
