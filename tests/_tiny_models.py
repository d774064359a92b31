"""Tiny random Hugging Face models and a tokenizer built in code (see :mod:`fastppo.tiny`), and ragged prompts."""

from __future__ import annotations

import torch

from fastppo.tiny import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, UNK, UNK_ID, tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: F401


def ragged_prompts(
    batch: int = 4,
    *,
    vocab: int = 128,
    min_len: int = 1,
    max_len: int = 7,
    seed: int = 0,
    first_token: int = 4,
    pad_id: int = PAD_ID,
):
    """Left-padded random prompts of different lengths: ``(input_ids [B, max_len], attention_mask [B, max_len])``.

    Lengths are spread over ``[min_len, max_len]`` with the last row full; tokens avoid the special ids.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    lengths[-1] = max_len
    ids = torch.randint(first_token, vocab, (batch, max_len), generator=g)
    mask = torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    return ids.masked_fill(~mask, pad_id), mask.long()


def hf_greedy(model, ids, mask, new, eos=None):
    """Hugging Face ``generate``, greedy, with ``eos`` as the stop token(s) (``None``: none) and ``PAD_ID``."""
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID
    )


_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "initializer_range",
)


def tiny_sliding(arch: str, window: int, *, seed: int = 0):
    """A random causal LM with the tiny Llama's sizes and a sliding window of ``window`` tokens on every
    layer: ``arch="mistral"`` (``MistralConfig(sliding_window=...)``, no ``layer_types``) or ``"qwen2"``
    (``use_sliding_window=True``: every layer a ``sliding_attention`` one). Float32, eval mode."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    base = tiny_llama().config
    sizes = {k: getattr(base, k) for k in _SIZES}
    if arch == "mistral":
        cls, config = MistralForCausalLM, MistralConfig(**sizes, sliding_window=window)
    else:
        cls = Qwen2ForCausalLM
        config = Qwen2Config(**sizes, use_sliding_window=True, sliding_window=window, max_window_layers=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(config).eval()
