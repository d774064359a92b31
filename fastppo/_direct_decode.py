"""The eager decode step of plain Llama / Qwen2 / Mistral models, written out (:class:`DirectDecode`).

Used by :class:`fastppo.Generator` when no CUDA graph replays the step (on the CPU): a small model's
eager step is mostly the per-call machinery of the model's forward, not its arithmetic.
"""

from __future__ import annotations

import torch

from fastppo.attention import PaddedPrefill, SdpaDecode, decode_sdpa, decode_views, prefill_padded


class DirectDecode:
    """The decode step's model forward, written out for the models of
    :func:`fastppo._generation_checks.direct_decode_layers` (Llama, Qwen2, Mistral).

    ``DirectDecode(model, layers)(plan, tokens [b, 1], positions [b, 1]) -> logits [b, 1, V]``, and
    :meth:`prefill` for the padded prompts: the operations of the model's own forward, calling its
    embedding, rotary embedding, norms, activation and lm_head modules, with attention by
    :func:`fastppo.attention.decode_sdpa` / ``prefill_padded`` (what the model's path through
    ``fastppo_attention`` runs); without the rest of that forward: mask creation,
    output capture, kwargs plumbing and the nested module calls, most of an eager step of a small model
    on CPU. The RMSNorms are ``F.rms_norm`` where the weights are float32 (ATen's composite: the module's
    operations in its order, one call instead of seven). Two fusions: q/k/v in one GEMM and gate/up in
    another (their weights concatenated, once per :meth:`Generator.generate` call: the optimizer updates
    the weights in place between calls; dropped after it), and RoPE on q and k at once (elementwise: the
    same values). With a RoPE whose frequencies
    are fixed (every type but the dynamic ones and longrope, which change them with the sequence length),
    cos/sin come from a table of positions ``0..max_length-1`` made by the model's rotary module once per
    call, instead of from that module at every step.
    """

    def __init__(self, model, layers, max_length: int):
        self.embed, self.rotary, self.norm = model.model.embed_tokens, model.model.rotary_emb, _norm(model.model.norm)
        self.lm_head = model.lm_head
        self.table = None
        kind = getattr(self.rotary, "rope_type", None)
        if isinstance(kind, str) and "dynamic" not in kind and kind != "longrope":
            w = self.embed.weight
            with torch.no_grad():
                cos, sin = self.rotary(w[:1, None], torch.arange(max_length, device=w.device)[None])
            self.table = (cos[0], _signed(sin[0]))  # [max_length, D] each
        self._views_shape, self._views = None, []
        self.layers = []  # per layer: a tuple, read by position in the hot loop
        with torch.no_grad():
            for layer in layers:
                a, mlp = layer.self_attn, layer.mlp
                d = a.head_dim
                self.layers.append(
                    (
                        _norm(layer.input_layernorm),
                        _cat_linear([a.q_proj, a.k_proj, a.v_proj]),
                        (a.q_proj.out_features // d, a.k_proj.out_features // d, d),
                        float(a.scaling),
                        a.layer_idx,
                        (a.o_proj.weight, a.o_proj.bias),
                        _norm(layer.post_attention_layernorm),
                        _cat_linear([mlp.gate_proj, mlp.up_proj]),
                        mlp.act_fn,
                        (mlp.down_proj.weight, mlp.down_proj.bias),
                    )
                )

    def __call__(self, plan: SdpaDecode, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        keys, values = plan.cache.keys, plan.cache.values
        shape = (tokens.shape[0], plan.mask.shape[-1])  # (bucket, key length): the same for many steps
        if shape != self._views_shape:
            self._views_shape, self._views = shape, [decode_views(k, v, *shape) for k, v in zip(keys, values)]
        views = self._views
        attend = lambda i, q, k, v, scale: decode_sdpa(plan, q, k, v, keys[i], values[i], scale, views[i])  # noqa: E731
        return self._forward(tokens, positions, attend)

    def prefill(self, plan: PaddedPrefill, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The padded prefill (``tokens``/``positions`` ``[b, P]``, ``plan`` as :meth:`Generator._prefill`
        builds it): fills the cache as the model's forward does through ``fastppo_attention``; returns the
        last position's logits ``[b, 1, V]`` (``logits_to_keep=1``)."""
        keys, values = plan.cache.keys, plan.cache.values
        attend = lambda i, q, k, v, scale: prefill_padded(plan, q, k, v, keys[i], values[i], scale)  # noqa: E731
        return self._forward(tokens, positions, attend, last_only=True)

    def _forward(self, tokens, positions, attend, *, last_only: bool = False) -> torch.Tensor:
        """``tokens``/``positions`` ``[b, T]``; ``attend(layer, q, k, v, scale) -> [b, T, Hq, D]``."""
        linear = torch.nn.functional.linear
        b, T = tokens.shape
        h = self.embed(tokens)
        if self.table is not None:
            cos, sin = (t[positions] for t in self.table)
        else:
            cos, sin = self.rotary(h, positions)
            sin = _signed(sin)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, T, D] over [b, heads, T, D]
        for norm1, qkv, (nq, nkv, d), scale, i, o, norm2, gate_up, act, down in self.layers:
            x = linear(norm1(h), *qkv).view(b, T, -1, d).transpose(1, 2)  # [b, Hq + 2 Hkv, T, D]
            qk, v = x[:, : nq + nkv], x[:, nq + nkv :]
            # the model's q * cos + rotate_half(q) * sin, with rotate_half(q) = cat(-q2, q1): roll gives
            # cat(q2, q1) and the sign sits in sin (-a * b == a * -b exactly), one op instead of four
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            out = attend(i, qk[:, :nq], qk[:, nq:], v, scale)  # [b, T, Hq, D]
            h = h + linear(out.reshape(b, T, -1), *o)
            gate, up = linear(norm2(h), *gate_up).chunk(2, dim=-1)
            h = h + linear(act(gate) * up, *down)
        if last_only:  # the norm is per position: taking the last one first changes no value
            h = h[:, -1:]
        return self.lm_head(self.norm(h))


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin [..., D]`` with its first half negated: rotate_half's sign, for :meth:`DirectDecode._forward`."""
    d = sin.shape[-1] // 2
    return torch.cat((-sin[..., :d], sin[..., d:]), dim=-1)


def _cat_linear(mods) -> tuple:
    """``(weight, bias)`` of the ``nn.Linear`` modules ``mods`` stacked along their outputs (bias None without)."""
    return torch.cat([m.weight for m in mods]), None if mods[0].bias is None else torch.cat([m.bias for m in mods])


def _norm(module):
    """The RMSNorm ``module`` as a function: ``F.rms_norm`` on its weight when float32 (bitwise the module:
    float32 in, the same ops in the same order), the module itself otherwise (a half-precision weight
    multiplies after the cast back, a detail ATen's composite orders differently)."""
    w, eps = module.weight, module.variance_epsilon
    if w.dtype != torch.float32:
        return module
    shape, rms_norm = (w.shape[-1],), torch.nn.functional.rms_norm
    return lambda h: rms_norm(h, shape, w, eps)
