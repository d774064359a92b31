"""Which models fastppo.Generator accepts: wrapped models (torch.compile, DDP, DataParallel, ``.module``
wrappers), and the clear refusals of the unsupported ones."""

from __future__ import annotations

import socket

import pytest
import torch

import fastppo
from fastppo.attention import ATTN_NAME
from tests._tiny_models import hf_greedy, ragged_prompts, tiny_llama, tiny_sliding

P = 7  # prompt width of ragged_prompts


def _greedy(model, ids, mask):
    gen = fastppo.Generator(model, max_batch_size=4, max_length=16)
    return gen, gen.generate(ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=None).sequences


@pytest.fixture(scope="module")
def ddp_group():
    """A one-process gloo group on a free local port, destroyed after the module's tests."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    yield
    dist.destroy_process_group()


class _Engine:  # a training engine that is not a Module but holds one (as DeepSpeed's and accelerate's do)
    def __init__(self, module):
        self.module = module


@pytest.mark.parametrize("wrap", ["compile", "ddp", "data_parallel", "engine", "compiled_ddp"])
def test_wrapped_models_run_the_underlying_module(wrap, request):
    model = tiny_llama(seed=1)
    if wrap in ("ddp", "compiled_ddp"):
        request.getfixturevalue("ddp_group")
    wrapped = {
        "compile": lambda: torch.compile(model),
        "ddp": lambda: torch.nn.parallel.DistributedDataParallel(model),
        "data_parallel": lambda: torch.nn.DataParallel(model),
        "engine": lambda: _Engine(model),
        "compiled_ddp": lambda: torch.compile(torch.nn.parallel.DistributedDataParallel(model)),
    }[wrap]()
    ids, mask = ragged_prompts(3, max_len=P, seed=2)
    gen, out = _greedy(wrapped, ids, mask)
    assert gen.model is model
    assert torch.equal(out, hf_greedy(model, ids, mask, 5))


@pytest.mark.parametrize("arch,window", [("mistral", 4096), ("mistral", 12), ("qwen2", 12)])
def test_sliding_window_at_least_max_length_is_full_attention(arch, window):
    # a query sees the `window` most recent keys: every one of them while max_length <= window
    model = tiny_sliding(arch, window, seed=3)
    ids, mask = ragged_prompts(3, max_len=P, seed=4)
    gen = fastppo.Generator(model, max_batch_size=4, max_length=12)
    out = gen.generate(ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 5))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_below_max_length_is_refused(arch):
    model = tiny_sliding(arch, 11)
    with pytest.raises(
        ValueError, match=r"only full-attention layers.*max_length <= sliding_window=11, got max_length=12"
    ):
        fastppo.Generator(model, max_batch_size=1, max_length=12)


def test_attention_refuses_a_window_below_max_length():
    # the window the model passes at run time is checked too (here the config changed after the Generator)
    model = tiny_sliding("mistral", 4096)
    gen = fastppo.Generator(model, max_batch_size=1, max_length=12)
    ids, mask = ragged_prompts(1, max_len=P)
    model.config.sliding_window = 8
    with pytest.raises(ValueError, match=r"sliding_window=8 < max_length=12 \(layer 0\)"):
        gen.generate(ids, mask, max_new_tokens=2)


def test_unsupported_models():
    from transformers import LlamaConfig, T5Config, T5ForConditionalGeneration

    with pytest.raises(TypeError, match="must be a Hugging Face causal LM"):
        fastppo.Generator(torch.nn.Linear(2, 2), max_batch_size=1, max_length=8)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        fastppo.Generator(t5, max_batch_size=1, max_length=8)

    class NoAttention(torch.nn.Module):  # looks like an HF LM but never calls the attention interface
        _supports_attention_backend = True

        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
            self.emb = torch.nn.Embedding(16, 16)

        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            return type("Out", (), {"logits": self.emb(input_ids)})()

    with pytest.raises(ValueError, match=f"expected one '{ATTN_NAME}' attention call per layer"):
        fastppo.Generator(NoAttention(), max_batch_size=1, max_length=8)

    class NoKeep(NoAttention):
        def forward(self, input_ids=None):
            return None

    with pytest.raises(ValueError, match="no `logits_to_keep`"):
        fastppo.Generator(NoKeep(), max_batch_size=1, max_length=8)
