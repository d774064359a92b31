"""Input validation of :mod:`fastppo.generation`: which models the Generator supports, and the checks
of its arguments (each error names the argument)."""

from __future__ import annotations

import contextlib
import inspect
import numbers
from dataclasses import dataclass

import torch

from fastppo._checks import check_bool, check_int, check_mask, check_number

MAX_EOS = 8  # EOS ids live in a fixed-size device buffer (padded with -1) so that a graph serves any set


@dataclass
class ModelInfo:
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    device: torch.device
    dtype: torch.dtype


def unwrap_model(model):
    """The module that really computes: ``torch.compile``'s ``OptimizedModule`` holds it in ``_orig_mod``,
    DDP, ``DataParallel`` and engines alike (an object without a ``config``) in ``.module``; nested
    wrappers are unwrapped in turn."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module) and getattr(model, "config", None) is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner


def inspect_model(model, max_length: int) -> ModelInfo:
    """Static checks for 'unsupported model' (``max_length``: the longest sequence the Generator will
    run); :meth:`Generator._probe` then runs one token through it."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise TypeError(
            f"model must be a Hugging Face causal LM (a PreTrainedModel with a config), got {type(model).__name__}"
        )
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported model {name}: encoder-decoder models are not supported, only decoder-only causal LMs"
        )
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"unsupported model {name}: its forward has no `logits_to_keep` argument "
            "(not a transformers>=4.50 causal LM?)"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"unsupported model {name}: it does not route attention through transformers' AttentionInterface"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_full_attention(name, text, max_length)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    return ModelInfo(text.num_hidden_layers, kv_heads, head_dim, text.vocab_size, param.device, dtype)


def _check_full_attention(name: str, text, max_length: int) -> None:
    """Only full (causal) attention is implemented. A sliding window of ``W`` lets a query see the ``W``
    most recent keys, itself included: all of them while ``max_length <= W``, where it equals full attention."""
    layer_types = getattr(text, "layer_types", None) or []
    kinds = {t for t in layer_types if t != "full_attention"}
    window = getattr(text, "sliding_window", None)
    if not layer_types and window is not None and getattr(text, "use_sliding_window", True):
        kinds = {"sliding_attention"}  # configs without layer_types (Mistral): one window for every layer
    if not kinds or (kinds == {"sliding_attention"} and window is not None and max_length <= window):
        return
    why = f"unsupported model {name}: only full-attention layers are supported, found {sorted(kinds)}"
    if "sliding_attention" in kinds and window is not None:
        why += (
            f"; sliding-window attention equals full attention when max_length <= sliding_window={window}, "
            f"got max_length={max_length}"
        )
    raise ValueError(why)


@contextlib.contextmanager
def eval_mode(model):
    if not any(m.training for m in model.modules()):  # already in eval: train() would set every module twice
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_token(name: str, value, vocab: int) -> int:
    """A token id: an integer in ``[0, vocab)``."""
    return check_number(name, value, integer=True, ge=0, lt=vocab)


class _FromModel:
    """The type of :data:`FROM_MODEL`."""

    def __repr__(self) -> str:
        return "FROM_MODEL"


FROM_MODEL = _FromModel()  # default of eos_token_id/pad_token_id: the model's generation_config value


def check_eos(name: str, eos_token_id, vocab: int) -> list[int]:
    """``None`` (no stop token), one id or a list/tuple of at most :data:`MAX_EOS` ids; returns the list."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (list, tuple)):
        eos = list(eos_token_id)
    elif isinstance(eos_token_id, numbers.Integral):  # a bool is Integral too: check_token refuses it
        eos = [eos_token_id]
    else:
        raise TypeError(f"{name} must be an int, a list/tuple of ints or None, got {type(eos_token_id).__name__}")
    if len(eos) > MAX_EOS:
        raise ValueError(f"{name}: at most {MAX_EOS} ids are supported, got {len(eos)}")
    return [check_token(name, e, vocab) for e in eos]


def special_tokens(model, eos_token_id, pad_token_id, vocab: int) -> tuple[list[int], int]:
    """``(eos ids, pad id)`` as Hugging Face ``generate`` (5.x) resolves them: :data:`FROM_MODEL` takes the
    value of ``model.generation_config`` (``None`` without one), an explicit ``None`` EOS means no stop
    token, and a ``None`` pad id is the first EOS id (``0`` without EOS: no row is ever padded then)."""
    config = getattr(model, "generation_config", None)
    eos_token_id, eos_name = _from_model(config, "eos_token_id", eos_token_id)
    pad_token_id, pad_name = _from_model(config, "pad_token_id", pad_token_id)
    eos = check_eos(eos_name, eos_token_id, vocab)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, check_token(pad_name, pad_token_id, vocab)


def _from_model(config, key: str, value):
    """``(value, its name in errors)``: the ``generation_config`` attribute for :data:`FROM_MODEL`."""
    if value is FROM_MODEL:
        return getattr(config, key, None), f"model.generation_config.{key}"
    return value, key


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings as Python scalars (``top_k`` ``0``: off, ``top_p`` ``1.0``: off)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float

    @property
    def mode(self) -> str:
        """The :func:`fastppo.sampling.sample_tokens` mode."""
        if not self.do_sample:
            return "greedy"
        return "filter" if self.top_k > 0 or self.top_p < 1 else "sample"


def check_sampling(do_sample, temperature, top_k, top_p, generator) -> Sampling:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return Sampling(
        do_sample=check_bool("do_sample", do_sample),
        temperature=check_number("temperature", temperature, gt=0),
        top_k=check_number("top_k", top_k, integer=True, ge=0),
        top_p=check_number("top_p", top_p, gt=0, le=1),
    )


def check_prompts(input_ids, attention_mask, vocab: int, device):
    """Returns ``(ids int64, mask bool, lengths)``; a few one-boolean syncs, once per call."""
    check_int("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape [batch, prompt_length] with both > 0, got {tuple(input_ids.shape)}"
        )
    mask = check_mask("attention_mask", attention_mask, input_ids.shape)
    for name, t in (("input_ids", input_ids), ("attention_mask", mask)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}")
    ids = input_ids.long()
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary size), found {int(ids[bad][0])}")
    m = mask.long()
    lengths = m.sum(-1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"attention_mask: row {row} has no real token (every prompt needs one)")
    right = (m[:, 1:] < m[:, :-1]).any(-1)
    if bool(right.any()):
        raise ValueError(
            f"attention_mask must be left-padded (zeros, then ones), row {int(right.nonzero()[0])} is not; "
            "use tokenizer.padding_side = 'left'"
        )
    return ids, mask, lengths


# the decoder layers whose forward :class:`fastppo._direct_decode.DirectDecode` (and the trainer's
# ``fastppo.trainer.models._last_layer``) reproduces: pre-norm residual blocks of RMSNorm, q/k/v projections
# (biases or not), RoPE through ``apply_rotary_pos_emb``, attention, o_proj, RMSNorm, ``down(act(gate(x)) *
# up(x))``; the body: embedding, these layers, a final norm; the causal LM: the body and an lm_head.
# Per family: (causal LM, body, decoder layer, attention, MLP, RMSNorm) class names.
DIRECT_LAYERS = {
    "llama": ("LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model", "Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "mistral": (
        "MistralForCausalLM", "MistralModel", "MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm",
    ),
}  # fmt: skip


def is_family_class(module, name: str, family: str) -> bool:
    """Whether ``module`` is exactly transformers' class ``name`` of model family ``family`` (no subclass)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == f"transformers.models.{family}.modeling_{family}"


def direct_decode_layers(model, max_length: int) -> list | None:
    """The decoder layers of ``model`` when :class:`fastppo._direct_decode.DirectDecode` can run its forward
    (exactly the classes of :data:`DIRECT_LAYERS`, every projection a plain ``nn.Linear``, the
    embedding a plain ``nn.Embedding``, no forward hook or pre-hook anywhere: PEFT adapters, quantized
    layers and hooks keep the model's own forward; full attention up to ``max_length``, as checked at
    construction: a window the config gained since is the model's forward's to refuse); None otherwise."""
    family = next((f for f, names in DIRECT_LAYERS.items() if is_family_class(model, names[0], f)), None)
    if family is None:
        return None
    try:
        _check_full_attention(type(model).__name__, model.config, max_length)
    except ValueError:
        return None
    _, _, layer_cls, attn_cls, mlp_cls, norm_cls = DIRECT_LAYERS[family]
    base = getattr(model, "model", None)
    if base is None or any(not hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    if type(base.embed_tokens) is not torch.nn.Embedding or type(model.lm_head) is not torch.nn.Linear:
        return None
    if getattr(base.config, "pretraining_tp", 1) != 1 or not is_family_class(base.norm, norm_cls, family):
        return None
    layers = list(base.layers[: base.config.num_hidden_layers])
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        classes = ((layer, layer_cls), (attn, attn_cls), (mlp, mlp_cls))
        if not all(is_family_class(m, name, family) for m, name in classes):
            return None
        norms = (getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm"))
        if not all(is_family_class(n, norm_cls, family) for n in norms):
            return None
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(lin) is not torch.nn.Linear for lin in linears):
            return None
        for group in (linears[:3], linears[4:6]):  # fused below: all with a bias or none
            if len({lin.bias is None for lin in group}) != 1:
                return None
    return layers
