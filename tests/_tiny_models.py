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
