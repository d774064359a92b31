"""Attention for the whole project: which ``attn_implementation`` to use, padding-free packing, and the
attention function that :class:`fastppo.Generator` plugs into a Hugging Face model.

One decision for everything (:func:`choose_attn_implementation`): ``"flash_attention_2"`` when the
``flash-attn`` package imports and the model runs on CUDA, else ``"sdpa"`` (PyTorch picks its own
flash/memory-efficient kernel). The trainer loads its models with that choice. Sequences can be packed
padding-free (:func:`pack_padded`) only with flash-attn (:func:`padding_free`): only it has a varlen kernel.

The generator does not use Hugging Face's KV caches: it registers :func:`fastppo_attention` in
transformers' ``AttentionInterface`` under :data:`ATTN_NAME` and switches a model's config to it for the
duration of a rollout (:func:`attn_implementation`). The model then runs its own embeddings, norms,
projections, rotary embedding and MLP, and hands each layer's new ``q, k, v`` (after RoPE) to that
function, which writes ``k, v`` into our static cache and attends. The cache, positions and masks come
from the plan (:data:`AttentionPlan`: one frozen dataclass per kind of forward) that the generator passes
as the ``fastppo_plan`` keyword of the model's forward (transformers hands unknown forward kwargs down to
the attention function, which is also how its flash-attention kwargs travel; unlike a global,
``torch.compile`` traces it). This avoids every version-dependent ``Cache`` API (5.17 and 5.24 differ),
and leaves the decode step free of host syncs, so it can be captured in a CUDA graph.

KV-cache layout: per layer ``[max_batch, max_length, kv_heads, head_dim]`` (flash-attn's layout), each row
**left-aligned**: a prompt with ``n`` real tokens fills slots ``0..n-1`` whatever its left padding, so the
slot of a token is its position id, and a row's valid keys are a prefix of length ``seqlens[row]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_NAME = "fastppo_rollout"


# --------------------------------------------------------------------------------------------------
# The project-wide choice
# --------------------------------------------------------------------------------------------------
@functools.cache
def flash_attn_available() -> bool:
    """Whether the ``flash-attn`` package (2.x, ``flash_attn_varlen_func``/``flash_attn_with_kvcache``) imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA raises at import, not at find_spec
        return False
    return True


def choose_attn_implementation(device=None) -> str:
    """The ``attn_implementation`` for models on ``device`` (default: CUDA if present, else CPU).

    ``"flash_attention_2"`` with flash-attn on CUDA (it also enables padding-free packed training
    forwards), else ``"sdpa"``. Pass the result to ``from_pretrained(..., attn_implementation=...)`` or
    ``model.set_attn_implementation``.
    """
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def padding_free(device=None) -> bool:
    """Whether training forwards on ``device`` should pack sequences without padding (:func:`pack_padded`)."""
    return choose_attn_implementation(device) == "flash_attention_2"


@dataclass
class PackedBatch:
    """A left/right-padded batch packed into one row without padding (flash-attn varlen format).

    ``input_ids``/``position_ids`` ``[1, T]`` (positions restart at 0 for every sequence, which is how
    transformers' flash-attention path detects the packing), ``cu_seqlens`` int32 ``[B + 1]``,
    ``max_seqlen`` (int), ``indices`` int64 ``[T]``: flat indices into the ``[B, P]`` padded layout.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor
    shape: tuple

    def unpack(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """``values`` ``[1, T, ...]`` or ``[T, ...]`` back to the padded ``[B, P, ...]`` layout, ``fill`` at padding."""
        if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == self.indices.numel():
            values = values[0]
        out = values.new_full((self.shape[0] * self.shape[1], *values.shape[1:]), fill)
        out[self.indices] = values
        return out.view(*self.shape, *values.shape[1:])


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
    """Pack the real tokens of a padded ``[B, P]`` batch into ``[1, T]`` (reads the lengths back: one sync)."""
    from fastppo._checks import check_int, check_mask

    check_int("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    mask = check_mask("attention_mask", attention_mask, input_ids.shape)
    lengths = mask.sum(-1)
    indices = mask.flatten().nonzero().flatten()
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    positions = (mask.long().cumsum(-1) - 1).flatten()[indices]
    return PackedBatch(
        input_ids=input_ids.flatten()[indices][None],
        position_ids=positions[None],
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        indices=indices,
        shape=tuple(input_ids.shape),
    )


# --------------------------------------------------------------------------------------------------
# The generator's attention function
# --------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Static per-layer K/V buffers ``[max_batch, max_length, kv_heads, head_dim]`` (rows left-aligned)."""

    keys: list
    values: list

    @classmethod
    def allocate(cls, layers, batch, length, kv_heads, head_dim, dtype, device) -> KVCache:
        shape = (batch, length, kv_heads, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What one forward of the model does with attention: one frozen subclass per kind of forward.

    ``cache``: the static K/V cache the forward writes (and reads). ``on_call``: optional
    ``callback(layer_idx)`` run by every attention call, eager forwards only (the generator's model probe).
    """

    cache: KVCache
    on_call: Callable[[int], None] | None = None


@dataclass(frozen=True, kw_only=True)
class PaddedPrefill(_Plan):
    """Prefill of a left-padded ``[B, P]`` batch with one masked SDPA. ``mask`` bool ``[B, 1, P, P]``;
    ``rows``/``times`` int64 ``[n]``: (batch, time) indices of the ``n`` real tokens; ``slots`` int64 ``[n]``
    their cache slots."""

    mask: torch.Tensor
    rows: torch.Tensor
    times: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class PackedPrefill(_Plan):
    """Prefill of a packed ``[1, T]`` batch. ``cu_seqlens`` int32 ``[B + 1]``/``max_seqlen`` as flash-attn's
    varlen API; ``rows``/``slots`` int64 ``[T]``: where each token goes in the cache. ``flash``: flash-attn's
    varlen kernel, else one causal SDPA per sequence."""

    rows: torch.Tensor
    slots: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    flash: bool


@dataclass(frozen=True, kw_only=True)
class SdpaDecode(_Plan):
    """One new token per row for the first ``B`` rows, SDPA over the first ``kv_len`` cache slots.
    ``seqlens`` int64 ``[B]``: tokens already cached (= the slot written now); ``mask`` bool
    ``[B, 1, 1, kv_len]``: the valid slots ``0..seqlens``; ``rows`` int64 ``[B]``: ``arange(B)`` (None: made
    by every layer)."""

    seqlens: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class FlashDecode(_Plan):
    """One new token per row for the first ``B`` rows with ``flash_attn_with_kvcache``; ``seqlens32``
    int32 ``[B]``: its ``cache_seqlens`` (tokens already cached)."""

    seqlens32: torch.Tensor


AttentionPlan = PaddedPrefill | PackedPrefill | SdpaDecode | FlashDecode


@contextlib.contextmanager
def attn_implementation(model, name: str = ATTN_NAME) -> Iterator[None]:
    """Switch ``model``'s attention to ``name`` inside the block and restore the previous setting after.

    Sets the config attribute directly rather than ``model.set_attn_implementation``: that method
    validates against the model's supported kernels and rebuilds sub-configs, and we must restore the
    exact previous value (also on error): training goes on with the same model.
    """
    register()
    configs = {
        id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()) if c is not None
    }
    saved = [(c, c._attn_implementation) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation = name
        yield
    finally:
        for c, value in saved:
            c._attn_implementation = value


@functools.cache
def register() -> None:
    """Register :func:`fastppo_attention` in transformers' global ``AttentionInterface`` (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, fastppo_attention)


# kwargs some models pass that change the attention itself; silently ignoring them would be wrong
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def fastppo_attention(
    module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, fastppo_plan=None, **kwargs
):
    """transformers attention-interface function. ``query`` ``[B, Hq, T, D]``, ``key``/``value``
    ``[B, Hkv, T, D]`` after RoPE; returns ``([B, T, Hq, D], None)``. ``attention_mask`` is ignored (the
    plan carries the masks), ``dropout`` too (rollouts run in eval mode)."""
    plan: AttentionPlan | None = fastppo_plan
    if not isinstance(plan, _Plan):
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} needs the fastppo_plan forward kwarg: it only works inside "
            "fastppo.Generator, with a model that passes its forward kwargs down to the attention function"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"fastppo.Generator does not support attention with {name}={kwargs[name]!r} (layer {module.layer_idx})"
            )
    layer = module.layer_idx
    if plan.on_call is not None:
        plan.on_call(layer)
    k_cache, v_cache = plan.cache.keys[layer], plan.cache.values[layer]
    window = kwargs.get("sliding_window")
    if window is not None and window < k_cache.shape[1]:  # a window spanning the whole cache is full attention
        raise ValueError(
            f"fastppo.Generator does not support attention with sliding_window={window!r} < "
            f"max_length={k_cache.shape[1]} (layer {layer})"
        )
    if key.shape[1] != k_cache.shape[2] or key.shape[3] != k_cache.shape[3]:  # Python ints: free, not in replays
        raise ValueError(
            f"layer {layer}: the model produced keys with {key.shape[1]} heads of dim {key.shape[3]}, the cache "
            f"was sized for {k_cache.shape[2]} x {k_cache.shape[3]} from the config"
        )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(plan, SdpaDecode):
        out = decode_sdpa(plan, query, key, value, k_cache, v_cache, scale)
    elif isinstance(plan, FlashDecode):
        out = _decode_flash(plan, query, key, value, k_cache, v_cache, scale)
    elif isinstance(plan, PackedPrefill):
        out = _prefill_packed(plan, query, key, value, k_cache, v_cache, scale)
    else:
        out = prefill_padded(plan, query, key, value, k_cache, v_cache, scale)
    return out, None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv * groups, T, D]``: query head ``h`` reads kv head ``h // groups``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def prefill_padded(plan: PaddedPrefill, query, key, value, k_cache, v_cache, scale):
    """The padded prefill's SDPA for one layer: writes the real tokens' keys/values at their slots, returns
    ``[B, T, Hq, D]``."""
    rows, times = plan.rows, plan.times
    # [B, Hkv, P, D] -> real tokens [n, Hkv, D], stored at (row, slot) with slot = position id
    k_cache[rows, plan.slots] = key.transpose(1, 2)[rows, times].to(k_cache.dtype)
    v_cache[rows, plan.slots] = value.transpose(1, 2)[rows, times].to(v_cache.dtype)
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=plan.mask, scale=scale
    )
    return out.transpose(1, 2)


def _prefill_packed(plan: PackedPrefill, query, key, value, k_cache, v_cache, scale):
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    k_cache[plan.rows, plan.slots] = k.to(k_cache.dtype)
    v_cache[plan.rows, plan.slots] = v.to(v_cache.dtype)
    if plan.flash:
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            plan.cu_seqlens,
            plan.cu_seqlens,
            plan.max_seqlen,
            plan.max_seqlen,
            softmax_scale=scale,
            causal=True,
        )
    else:  # reference for CPU tests and GPUs without flash-attn: one causal SDPA per sequence
        groups = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        bounds = plan.cu_seqlens.tolist()
        for s, e in itertools.pairwise(bounds):
            qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(
                qs, _repeat_kv(ks, groups), _repeat_kv(vs, groups), is_causal=True, scale=scale
            )
            out[s:e] = o[0].transpose(0, 1)
    return out[None]


def _decode_flash(plan: FlashDecode, query, key, value, k_cache, v_cache, scale):
    from flash_attn import flash_attn_with_kvcache

    b = query.shape[0]
    # appends k/v at cache_seqlens in place and attends to slots [0, seqlen]; a bucket is the first
    # rows of the cache: contiguous views
    return flash_attn_with_kvcache(
        query.transpose(1, 2),
        k_cache[:b],
        v_cache[:b],
        k=key.transpose(1, 2),
        v=value.transpose(1, 2),
        cache_seqlens=plan.seqlens32,
        softmax_scale=scale,
        causal=True,
    )


def decode_views(k_cache, v_cache, b: int, kv_len: int) -> tuple:
    """The keys/values a decode step of the first ``b`` rows reads: ``[b, Hkv, kv_len, D]`` strided views of
    the caches (no copy; valid as long as the caches are)."""
    return k_cache[:b, :kv_len].transpose(1, 2), v_cache[:b, :kv_len].transpose(1, 2)


def decode_sdpa(plan: SdpaDecode, query, key, value, k_cache, v_cache, scale, views=None):
    """One decode step of SDPA attention for the first ``b`` cache rows: ``query`` ``[b, Hq, 1, D]``,
    ``key``/``value`` ``[b, Hkv, 1, D]`` written at slots ``plan.seqlens``; returns ``[b, 1, Hq, D]``.
    ``views``: :func:`decode_views` of this step's shape (made here when None; a caller stepping many
    times at one shape makes them once)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    rows = plan.rows if plan.rows is not None else torch.arange(b, device=query.device)
    key, value = key[:, :, 0], value[:, :, 0]
    if key.dtype != k_cache.dtype:  # a Python test: a cast only where one is needed (autocast)
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_cache.index_put_((rows, plan.seqlens), key)  # rows < b: the bucket's rows, the first of the cache
    v_cache.index_put_((rows, plan.seqlens), value)
    k, v = views if views is not None else decode_views(k_cache, v_cache, b, plan.mask.shape[-1])
    # GQA without repeat_kv: the `groups` query heads of a kv head become `groups` query rows, so the
    # cache is read once instead of materialised Hq/Hkv times per step.
    q = query.reshape(b, hkv, hq // hkv, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scale)  # [b, Hkv, G, D]
    return out.reshape(b, hq, 1, d).transpose(1, 2)
