"""Tiny random Hugging Face models and a tokenizer built in code: no download, ever.

Used by the tests, the benchmarks' CPU mode and the default demo.

    tok = tiny_tokenizer()                       # char-level, <pad>=0 <eos>=1 <bos>=2 <unk>=3, left padding
    model = tiny_llama(vocab=len(tok), seed=0)   # LlamaForCausalLM, float32, eval mode
    model = tiny_qwen2(vocab=len(tok), seed=0)   # Qwen2ForCausalLM (q/k/v biases), float32, eval mode
    rm = tiny_reward_model(vocab=len(tok))       # Qwen2ForSequenceClassification, num_labels=1
    batch = tok(["hi", "hello"], return_tensors="pt", padding=True)

Defaults are small enough for CPU tests (hidden 64, 2 layers, 4 query / 2 key-value heads: GQA is
exercised). Weights are drawn from ``torch.manual_seed(seed)`` with a larger init std than the
config default so that logits are far from uniform (greedy ties are then practically impossible).
"""

from __future__ import annotations

import string

import torch

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def _common(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions, tie=False):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )


def _build(cls, config, seed, dtype):
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    if getattr(model, "generation_config", None) is not None:  # causal LMs only
        model.generation_config.pad_token_id = PAD_ID
    return model


def tiny_causal_lm(
    family: str = "llama",
    vocab: int = 128,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 256,
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    tie_word_embeddings: bool = False,
):
    """A random causal LM of ``family`` (``"llama"`` or ``"qwen2"``: biases on q/k/v) from a config
    (float32, eval mode); :func:`tiny_llama` and :func:`tiny_qwen2` name the two."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    config_cls, model_cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    config = config_cls(
        **_common(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions, tie_word_embeddings)
    )
    config._attn_implementation = attn_implementation
    return _build(model_cls, config, seed, dtype)


def tiny_llama(vocab: int = 128, **kwargs):
    """A random ``LlamaForCausalLM`` from a config (float32, eval mode); keywords as :func:`tiny_causal_lm`."""
    return tiny_causal_lm("llama", vocab, **kwargs)


def tiny_qwen2(vocab: int = 128, **kwargs):
    """A random ``Qwen2ForCausalLM`` (biases on q/k/v; float32, eval mode); keywords as :func:`tiny_causal_lm`."""
    return tiny_causal_lm("qwen2", vocab, **kwargs)


def tiny_reward_model(
    vocab: int = 128, *, seed: int = 0, hidden: int = 64, layers: int = 2, max_positions: int = 256, dtype=torch.float32
):
    """A random ``Qwen2ForSequenceClassification`` with one label (a reward model; float32, eval mode)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(**_common(vocab, hidden, layers, 4, 2, 2 * hidden, max_positions), num_labels=1)
    config._attn_implementation = "sdpa"
    return _build(Qwen2ForSequenceClassification, config, seed, dtype)


def tiny_tokenizer(padding_side: str = "left"):
    """A char-level ``PreTrainedTokenizerFast`` built in code: 4 special tokens then the printable ASCII
    characters (99 tokens in all, so it fits the default ``vocab=128`` of the tiny models)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, BOS, UNK, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side=padding_side,
    )
