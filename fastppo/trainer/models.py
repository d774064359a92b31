"""The models of a PPO step: the policy's log-prob head, the value model, the reference policy.

Every log-prob goes through :func:`fastppo.linear_logprobs_and_entropy` on the last hidden states: the
``[N, V]`` logits never exist. The output-embedding weight is read inside :meth:`LogProbHead.forward`,
so a tied embedding, a PEFT-wrapped model or an FSDP2-sharded wrapper (shard the ``LogProbHead``) is
seen as the module it really is at that moment.

Layout of a batch (what :class:`fastppo.Generator` returns): ``input_ids [B, P + N]`` is a left-padded
prompt of width ``P`` then the completion, ``attention_mask [B, P + N]`` marks real tokens. The hidden
state at position ``t`` predicts token ``t + 1``, so the completion's tokens ``input_ids[:, P:]`` are
scored by ``hidden[:, P - 1 : -1]``; a token's position id is the number of real tokens before it.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
from torch import nn

from fastppo._checks import check_int, check_mask, check_number
from fastppo._generation_checks import DIRECT_LAYERS, is_family_class
from fastppo.logprobs import linear_logprobs_and_entropy


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` int64 of a left-padded batch: real tokens count 0, 1, ...; padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model (what returns ``last_hidden_state``), also under PEFT."""
    get = getattr(model, "get_decoder", None)
    body = get() if get is not None else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
        if body is None or body is model:
            raise ValueError(f"cannot find the transformer body of {type(model).__name__} (no get_decoder/base_model)")
    return body


def sdpa_mask(body: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The 4D attention mask ``[B, 1, L, L]`` that ``body``'s own forward builds from the 2D ``attention_mask``
    of a padded batch (``causal & key is real``), as SDPA's additive form (0 / -inf, the model's dtype), or
    None where the model's path is to be kept: not on the CPU, not SDPA attention, sliding-window layers,
    another model type, or no padding (the model then runs SDPA with ``is_causal`` and no mask).

    Why: transformers builds the mask at every forward (``create_causal_mask``, a few hundred microseconds)
    and SDPA converts a boolean mask to this additive one in every layer; on the CPU, for a small model, a
    visible part of a training forward. SDPA converts with ``where(mask, 0, -inf)``: the same values, so the
    outputs are identical (``tests/test_trainer_models.py``)."""
    config = getattr(body, "config", None)
    if attention_mask.device.type != "cpu" or config is None or attention_mask.dim() != 2:
        return None
    if getattr(config, "model_type", None) not in DIRECT_LAYERS:  # decoders whose masks are causal & padding
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return None
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return None
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    embed = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    dtype = getattr(getattr(embed, "weight", None), "dtype", torch.float32)
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril_()
    keep = causal[None, None] & mask[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, float("-inf"))


def hidden_states(
    body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: slice | None = None
) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` of ``body`` on a left-padded batch (position ids from the mask);
    with ``keep``, a slice of positions, only those: ``[B, len(keep), H]`` (on the CPU fast path the last
    decoder layer computes only them, :func:`_last_layer`)."""
    full = sdpa_mask(body, attention_mask)
    positions = position_ids(attention_mask)
    if full is not None and _plain_body(body):
        return _layers_forward(body, input_ids, full, positions, keep)
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask if full is None else full,
        position_ids=positions,
        use_cache=False,
    ).last_hidden_state
    return out if keep is None else out[:, keep]


def _plain_body(body: nn.Module) -> bool:
    """Whether ``body`` is exactly the transformers body class of its model type (:data:`DIRECT_LAYERS`),
    without hooks of its own (the layers may have any: they are called as modules)."""
    family = getattr(body.config, "model_type", None)
    return (
        family in DIRECT_LAYERS
        and is_family_class(body, DIRECT_LAYERS[family][1], family)
        and not (body._forward_hooks or body._forward_pre_hooks)
    )


def _layers_forward(body: nn.Module, input_ids, mask4d, positions, keep: slice | None = None) -> torch.Tensor:
    """What the forward of a Llama / Qwen2 / Mistral body computes, without a cache: the embedding, the
    rotary embedding, each decoder layer called as a module (its hooks, gradient checkpointing and
    adapters act as in the model's forward), the final norm. Why: under :func:`sdpa_mask` the model's own
    forward adds only per-call machinery around these calls (argument defaults, mask preprocessing, output
    capture), ~0.6 ms of a 5 ms forward of a tiny model on the CPU; the result is identical
    (``tests/test_trainer_models.py``)."""
    h = body.embed_tokens(input_ids)
    rope = body.rotary_emb(h, position_ids=positions)
    layers = list(body.layers[: body.config.num_hidden_layers])
    last = layers.pop() if keep is not None and _plain_layer(layers[-1], body.config.model_type) else None
    for layer in layers:
        h = layer(h, attention_mask=mask4d, position_embeddings=rope, position_ids=positions)
    if last is not None:
        h = _last_layer(last, h, mask4d, rope, keep)
    elif keep is not None:
        h = h[:, keep]
    return body.norm(h)


def _plain_layer(layer: nn.Module, family: str) -> bool:
    """Whether :func:`_last_layer` may stand in for ``layer``: exactly the family's decoder layer and
    attention classes (whose forwards it writes out), no hooks on either (their calls are bypassed; the
    projections, norms and MLP are still called as modules), no gradient checkpointing."""
    _, _, layer_cls, attn_cls, _, _ = DIRECT_LAYERS[family]
    attn = getattr(layer, "self_attn", None)
    if not (is_family_class(layer, layer_cls, family) and is_family_class(attn, attn_cls, family)):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, attn)):
        return False
    return not (getattr(layer, "gradient_checkpointing", False) and layer.training)


def _last_layer(layer: nn.Module, h, mask4d, rope, keep: slice) -> torch.Tensor:
    """The decoder layer's forward (Llama / Qwen2 / Mistral, as transformers writes it) for the query
    positions ``keep`` only, over the keys and values of every position: ``[B, len(keep), H]``.

    Why: the log-probs and values read only the completion's positions, the reward model only the last,
    and a decoder's last layer feeds nothing else, so its q/o projections, attention rows and MLP at the
    other positions are wasted (for the reward model almost the whole layer). The kept rows' values are
    the full forward's (``tests/test_trainer_models.py``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    a = layer.self_attn
    rotate_half = sys.modules[type(a).__module__].rotate_half
    x = layer.input_layernorm(h)
    b, L, d = x.shape[0], x.shape[1], a.head_dim
    xq = x[:, keep]
    q = a.q_proj(xq).view(b, xq.shape[1], -1, d).transpose(1, 2)
    k = a.k_proj(x).view(b, L, -1, d).transpose(1, 2)
    v = a.v_proj(x).view(b, L, -1, d).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in rope)  # [B, 1, L, D], as apply_rotary_pos_emb
    q = q * cos[:, :, keep] + rotate_half(q) * sin[:, :, keep]
    k = k * cos + rotate_half(k) * sin
    out, _ = sdpa_attention_forward(
        a, q, k, v, mask4d[:, :, keep], dropout=a.attention_dropout if a.training else 0.0, scaling=a.scaling
    )
    h = h[:, keep] + a.o_proj(out.reshape(b, xq.shape[1], -1).contiguous())
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _check_batch(input_ids, attention_mask, prompt_length) -> torch.Tensor:
    check_int("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, P + N], got {tuple(input_ids.shape)}")
    mask = check_mask("attention_mask", attention_mask, input_ids.shape)
    check_number("prompt_length", prompt_length, integer=True, ge=1, lt=input_ids.shape[1])
    return mask


class LogProbHead(nn.Module):
    """Completion log-probs and entropy of a causal LM, from its hidden states.

    ``LogProbHead(model)`` wraps a Hugging Face causal LM (``get_output_embeddings()`` is its lm_head).
    ``forward(input_ids, attention_mask, prompt_length, *, completion_mask=None, temperature=1.0,
    entropy=True)`` returns ``(logprobs, entropy)``, each ``[B, N]`` float32 with ``N = L - P``:
    ``log_softmax(h @ W.T / temperature)`` of each completion token and the entropy of that
    distribution, 0 where ``completion_mask`` is false; ``entropy`` is None with ``entropy=False``.
    Differentiable with respect to the model's parameters.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        config = getattr(model, "config", None)
        for name in ("final_logit_softcapping", "logit_scale"):
            value = getattr(config, name, None)
            if value not in (None, 1, 1.0):
                raise ValueError(
                    f"unsupported model {type(model).__name__}: {name}={value} changes the logits after the "
                    "lm_head, which the fused log-prob kernel does not apply"
                )
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        *,
        completion_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        entropy: bool = True,
    ):
        mask = _check_batch(input_ids, attention_mask, prompt_length)
        P = int(prompt_length)
        labels = input_ids[:, P:]
        if completion_mask is not None:
            labels = labels.masked_fill(~check_mask("completion_mask", completion_mask, labels.shape), -100)
        hidden = hidden_states(decoder_of(self.model), input_ids, mask, keep=slice(P - 1, -1))
        head = self.model.get_output_embeddings()  # read here, in the forward: tied, PEFT and FSDP2 weights
        weight, bias = head.weight, getattr(head, "bias", None)
        if hidden.dtype != weight.dtype:  # autocast ran the body in bf16; the head follows it
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        lp, ent = linear_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=temperature, entropy=entropy
        )
        return _own(lp), None if ent is None else _own(ent)


def completion_logprobs(model, output, prompt_mask: torch.Tensor, *, temperature: float = 1.0, entropy: bool = True):
    """Log-probs and entropy ``[B, N]`` of the completions of a :class:`fastppo.GenerationOutput`.

    ``model``: the Hugging Face causal LM that generated them (or its :class:`LogProbHead`);
    ``prompt_mask [B, P]``: the attention mask of the left-padded prompts given to ``generate``;
    ``temperature``: the sampling temperature. Does the slicing, the position ids and the masking in one
    call; 0 on the padding after a row's end. Runs under the caller's grad mode (``torch.no_grad()`` for
    old/reference log-probs, with grad in the PPO update).
    """
    head = model if isinstance(model, LogProbHead) else LogProbHead(model)
    mask = torch.cat([prompt_mask.to(output.completion_mask.device).bool(), output.completion_mask], dim=1)
    return head(
        output.sequences,
        mask,
        output.prompt_length,
        completion_mask=output.completion_mask,
        temperature=temperature,
        entropy=entropy,
    )


class ValueModel(nn.Module):
    """Critic: a transformer body with a scalar head on every token (as TRL, OpenRLHF and verl).

    ``forward(input_ids, attention_mask, prompt_length)`` returns the values ``[B, N]`` float32 of the
    states before each completion token (``hidden[:, P - 1 : -1] @ w + b``, the state that chose the
    token), aligned with :class:`LogProbHead`'s log-probs.

    Construction: ``ValueModel(body, hidden_size)`` (head initialised to zero), or
    :meth:`from_reward_model` (a copy of the reward model's body and of its score head: the first
    values are the reward model's guess of the final score, OpenRLHF's choice) or :meth:`from_policy`
    (a copy of the policy's body; zero head, so the first values are 0 and the first advantages are
    the returns themselves).
    """

    def __init__(self, body: nn.Module, hidden_size: int, head: nn.Linear | None = None):
        super().__init__()
        self.body = body
        p = next(body.parameters())
        self.value_head = nn.Linear(hidden_size, 1, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if head is None:
                self.value_head.weight.zero_()
            else:
                self.value_head.weight.copy_(head.weight[:1])
            self.value_head.bias.zero_()
            if head is not None and head.bias is not None:
                self.value_head.bias.copy_(head.bias[:1])

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        return cls(copy.deepcopy(decoder_of(policy)), _hidden_size(policy))

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module) -> ValueModel:
        head = getattr(reward_model, "score", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"cannot initialise a critic from {type(reward_model).__name__}: no linear `score` head "
                "(use critic_init='policy')"
            )
        return cls(copy.deepcopy(decoder_of(reward_model)), _hidden_size(reward_model), head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        mask = _check_batch(input_ids, attention_mask, prompt_length)
        P = int(prompt_length)
        hidden = hidden_states(self.body, input_ids, mask, keep=slice(P - 1, -1))
        return _own(self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float())


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view: a sharded (FSDP2) module must return tensors of its own, since an
    in-place op on a returned view would skip FSDP2's pre-backward hook (it warns on every call)."""
    return t.clone() if t._base is not None else t


def _hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.hidden_size


def is_peft_model(model) -> bool:
    """Whether ``model`` is a PEFT model with adapters that can be switched off (``disable_adapter()``)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Reference:
    """The frozen reference policy of the KL penalty.

    ``Reference(policy, ref_model=None)``: ``ref_model`` when given (frozen here); else, for a PEFT
    policy, the policy itself with its adapters disabled (no second copy of the weights); else a frozen
    deep copy of the policy as it is now. ``logprobs(input_ids, attention_mask, prompt_length, ...)``
    gives ``[B, N]`` float32 without gradient, as :class:`LogProbHead`.
    """

    def __init__(self, policy: nn.Module, ref_model: nn.Module | None = None):
        self._adapters_off = None
        if ref_model is not None:
            model = ref_model
        elif is_peft_model(policy):
            model, self._adapters_off = policy, policy.disable_adapter
        else:
            model = copy.deepcopy(policy)
        if model is not policy:
            model.requires_grad_(False).eval()
        self.model = model
        self.head = LogProbHead(model)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, prompt_length, *, completion_mask=None, temperature=1.0):
        off = self._adapters_off() if self._adapters_off is not None else contextlib.nullcontext()
        with off:
            lp, _ = self.head(
                input_ids,
                attention_mask,
                prompt_length,
                completion_mask=completion_mask,
                temperature=temperature,
                entropy=False,
            )
        return lp
