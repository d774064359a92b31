"""Token sampling without host synchronisation, so that it can live inside a CUDA graph.

Every parameter that may change between rollouts (temperature, top-k, top-p) is a 0-dim tensor on the
device, read by the kernels, never by Python: a captured graph serves every setting. Randomness on a GPU is
the exponential (Gumbel-max) trick: ``argmax(log p - log E)`` with ``E ~ Exp(1)`` drawn by ``exponential_``
from a ``torch.Generator`` is an exact sample from ``p`` (``-log E`` is standard Gumbel), and draws from a
generator registered with the graph advance its Philox offset on every replay. On the CPU (no graph to
live in) it is the inverse CDF: one uniform per row instead of ``V`` exponentials (:func:`_inverse_cdf`).
"""

from __future__ import annotations

import torch

from fastppo._checks import check_choice

MODES = ("greedy", "sample", "filter")


def filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of temperature-scaled logits, sort-based, no host sync.

    ``scaled`` float32 ``[B, V]``; ``top_k`` int64 0-dim (``0``: off); ``top_p`` float32 0-dim (``1``: off).
    Returns ``[B, V]`` with the removed tokens at ``-inf``. As in transformers' warpers, top-p acts on the
    distribution renormalised after top-k, and keeps the smallest set of most likely tokens whose mass
    reaches ``top_p``: token of rank ``r`` is kept iff the mass of the ranks before it is ``< top_p``
    (so the most likely token is always kept). Ties at the top-k boundary are broken by sort order.
    """
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scaled.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 is "off": in float32 the running mass reaches 1 before the last ranks, and without
    # this term the far tail would be cut (thousands of tokens at V = 152k). A tensor test: no host sync.
    remove = (mass_before >= top_p) & (ranks > 0) & (top_p < 1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` (non-negative, unnormalised, float32) by the inverse CDF.

    Why on the CPU: a step of a small model is a handful of microseconds per op, and Gumbel-max draws
    ``V`` float64 uniforms per row and takes three logs of them (a quarter of a tiny model's decode step);
    this draws one uniform per row. Exact: the running sum is float64 (the interval of a token of
    probability 1e-12 is still resolved), ``u = (1 - r) * total`` lies in ``(0, total]`` for ``r`` in
    ``[0, 1)``, and the first index whose running sum reaches ``u`` always has a positive probability
    (a token of probability 0, filtered, adds nothing to the sum: it is never the first to reach ``u``).
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # each element cast, then summed in float64
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, generator=generator, device=probs.device)
    u = u.neg_().add_(1).mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, u).squeeze_(1)


def sample_tokens(
    logits: torch.Tensor,
    *,
    mode: str,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return ``(tokens int64 [B], logprobs float32 [B])``.

    ``logits`` ``[B, V]`` any float dtype (computed in float32). ``mode``: ``"greedy"`` (argmax of the
    logits, like ``generate(do_sample=False)``), ``"sample"`` (from ``softmax(logits / T)``) or ``"filter"``
    (sample after :func:`filter_top_k_top_p`). The log-prob is always
    ``log_softmax(logits / T)[token]``: the temperature-scaled distribution *before* top-k/top-p, which
    is what a training forward recomputes. ``generator`` (for the two sampling modes) must be on the device
    type of ``logits``: the draws are made there.
    """
    check_choice("mode", mode, MODES)
    if mode != "greedy" and generator is not None and generator.device.type != logits.device.type:
        raise ValueError(
            f"generator is on {generator.device} but logits are on {logits.device}: "
            f"sample with a torch.Generator(device={logits.device.type!r})"
        )
    scaled = logits.float() / temperature
    if logits.device.type == "cpu":
        logp = scaled.log_softmax(dim=-1)  # one fused op on the CPU: cheaper than gather - logsumexp there
        if mode == "greedy":
            tokens = logits.argmax(dim=-1)
        else:
            probs = logp.exp() if mode == "sample" else filter_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)
            tokens = _inverse_cdf(probs, generator)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze_(1)
    if mode == "greedy":
        tokens = logits.argmax(dim=-1)
    else:
        target = filter_top_k_top_p(scaled, top_k, top_p) if mode == "filter" else scaled
        noise = torch.empty_like(target).exponential_(generator=generator)
        # clamp: an Exp(1) draw of exactly 0 would give +inf and turn a -inf (filtered) logit into NaN
        gumbel = -noise.clamp_min_(torch.finfo(noise.dtype).tiny).log()
        tokens = (target + gumbel).argmax(dim=-1)
    # z[token] - logsumexp(z): one read of the row, no [B, V] log_softmax written just to pick one value
    return tokens, scaled.gather(-1, tokens[:, None])[:, 0] - scaled.logsumexp(dim=-1)
