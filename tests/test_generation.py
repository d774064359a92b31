"""fastppo.Generator on CPU (plain decode loop) against Hugging Face ``generate`` and a full forward.

CUDA-graph cases run only with a GPU.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.attention import choose_attn_implementation, pack_padded
from tests._tiny_models import EOS_ID, PAD_ID, hf_greedy, ragged_prompts, tiny_llama, tiny_qwen2, tiny_tokenizer
from tests._tol import requires_cuda

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
P = 7  # prompt width of ragged_prompts


@pytest.fixture(scope="module")
def models():
    return {name: build(seed=1) for name, build in BUILDERS.items()}


def eos_from_greedy(model, ids, mask, new, kind):
    """EOS ids that greedy decoding really emits. ``"one"``: the third token of row 0 (some rows stop,
    others run to the end); ``"many"``: the second token of every row (all stop early: the loop ends)."""
    free = hf_greedy(model, ids, mask, new)[:, P:]
    return int(free[0, 2]) if kind == "one" else sorted(set(free[:, 1].tolist()))


# ---------------------------------------------------------------------------------------------------
# greedy parity with HF generate
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("prefill", ["padded", "packed"])
@pytest.mark.parametrize("with_eos", [None, "one", "many"])
def test_greedy_matches_hf_generate(models, arch, prefill, with_eos):
    model = models[arch]
    ids, mask = ragged_prompts(5, max_len=P, seed=3)
    new = 9
    eos = eos_from_greedy(model, ids, mask, new, with_eos) if with_eos else None
    ref = hf_greedy(model, ids, mask, new, eos)
    # max_batch_size 8: the 5 rows are padded to bucket 8; check_every=1 + kv_block=4 cross
    # several key-length buckets and compact the batch as rows finish
    gen = fastppo.Generator(model, max_batch_size=8, max_length=24, prefill=prefill, check_every=1, kv_block=4)
    out = gen.generate(ids, mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID)
    assert out.sequences.shape == ref.shape
    assert torch.equal(out.sequences, ref)
    assert torch.equal(out.sequences[:, :P], ids)
    n = out.sequences.shape[1] - P
    assert out.completion_mask.shape == out.logprobs.shape == (5, n)
    assert out.completion_mask.dtype == torch.bool and out.logprobs.dtype == torch.float32
    comp = out.completions
    if with_eos:
        hit = torch.isin(comp, torch.tensor(eos))
        assert hit.any()  # EOS really happened
        if with_eos == "one":
            assert n == new and not out.completion_mask.all()  # some rows padded after EOS
        else:
            assert n < new and out.decode_steps < new - 1  # every row stopped: the loop ended early
        for row in range(5):
            stop = int(hit[row].nonzero()[0]) + 1 if hit[row].any() else n
            assert out.completion_mask[row, :stop].all() and not out.completion_mask[row, stop:].any()
            assert (comp[row, stop:] == PAD_ID).all() and (out.logprobs[row, stop:] == 0).all()
    else:
        assert n == new and out.completion_mask.all()
    assert out.num_tokens == int(out.completion_mask.sum())


def test_greedy_matches_hf_generate_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_qwen2(seed=5).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = tiny_tokenizer()
    batch = tok(["hello world", "a", "PPO!"], return_tensors="pt", padding=True)
    ref = hf_greedy(model, batch.input_ids, batch.attention_mask, 6, EOS_ID)
    out = fastppo.Generator(model, max_batch_size=4, max_length=32).generate(
        batch.input_ids,
        batch.attention_mask,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    assert torch.equal(out.sequences, ref)


def test_chunking_and_reuse_give_the_same_tokens(models):
    model = models["llama"]
    ids, mask = ragged_prompts(5, max_len=P, seed=4)
    ref = hf_greedy(model, ids, mask, 5)
    gen = fastppo.Generator(model, max_batch_size=2, max_length=16)  # 5 rows -> chunks of 2, 2, 1
    for _ in range(2):  # the second call reuses cache and buffers
        out = gen.generate(ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert torch.equal(out.sequences, ref)
    one = gen.generate(ids[:1], mask[:1], max_new_tokens=1, do_sample=False, eos_token_id=None)  # no decode step
    assert torch.equal(one.sequences, ref[:1, : P + 1]) and one.decode_steps == 0


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("kind", ["one", "many"])
def test_generation_config_defaults_match_hf_generate(arch, kind):
    # an omitted eos_token_id/pad_token_id is model.generation_config's, an explicit None eos is no stop
    # token and a None pad is the first EOS id: as Hugging Face generate does
    model = BUILDERS[arch](seed=1)
    ids, mask = ragged_prompts(5, max_len=P, seed=3)
    new = 9
    eos = eos_from_greedy(model, ids, mask, new, kind)  # an int ("one") or a list ("many")
    model.generation_config.eos_token_id = eos
    gen = fastppo.Generator(model, max_batch_size=8, max_length=24, check_every=1)
    cases = [{}, dict(eos_token_id=None), dict(pad_token_id=None), dict(eos_token_id=None, pad_token_id=None)]
    outs = []
    for kwargs in cases:
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)
        outs.append(gen.generate(ids, mask, max_new_tokens=new, do_sample=False, **kwargs).sequences)
        assert torch.equal(outs[-1], ref), kwargs
    stopped, free, eos_padded, _ = outs
    assert free.shape[1] == P + new and torch.isin(free[:, P:], torch.tensor(eos)).any()  # EOS emitted, no stop
    if kind == "many":
        assert stopped.shape[1] < P + new  # every row stopped: the loop ended early
    else:  # some rows stopped and were padded: with PAD_ID, or the EOS id when the pad id is None
        assert (stopped[:, P:] == PAD_ID).any() and not torch.equal(eos_padded, stopped)
    model.generation_config.pad_token_id = None  # no pad in the config either: the first EOS id
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=new, do_sample=False).sequences, ref)
    assert torch.equal(ref, eos_padded)


def test_generation_config_errors_name_it():
    model = BUILDERS["llama"](seed=1)
    gen = fastppo.Generator(model, max_batch_size=2, max_length=12)
    ids, mask = ragged_prompts(2, max_len=P)
    model.generation_config.eos_token_id = 500
    with pytest.raises(ValueError, match=r"model.generation_config.eos_token_id must be in \[0, 128\), got 500"):
        gen.generate(ids, mask, max_new_tokens=2)
    gen.generate(ids, mask, max_new_tokens=2, eos_token_id=EOS_ID)  # an explicit id needs nothing from the config
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 300
    with pytest.raises(ValueError, match=r"model.generation_config.pad_token_id must be in \[0, 128\)"):
        gen.generate(ids, mask, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------
# log-probs against a full forward
# ---------------------------------------------------------------------------------------------------
SETTINGS = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(do_sample=False, temperature=2.0)]


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("sampling", SETTINGS)
def test_logprobs_match_a_full_forward(models, arch, sampling):
    model = models[arch]
    ids, mask = ragged_prompts(4, max_len=P, seed=6)
    temperature = sampling["temperature"]
    out = fastppo.Generator(model, max_batch_size=4, max_length=20).generate(
        ids, mask, max_new_tokens=8, eos_token_id=EOS_ID, generator=torch.Generator().manual_seed(0), **sampling
    )
    full_mask = torch.cat([mask.bool(), out.completion_mask], dim=1)
    positions = (full_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask.long(), position_ids=positions).logits
    ref, _ = fastppo.logprobs_and_entropy(logits[:, P - 1 : -1], out.completions, temperature=temperature)
    m = out.completion_mask
    assert m[:, 0].all()
    torch.testing.assert_close(out.logprobs[m], ref[m], atol=2e-5, rtol=1e-5)
    assert (out.logprobs[~m] == 0).all()
    assert (out.logprobs[m] <= 0).all()


# ---------------------------------------------------------------------------------------------------
# the direct decode step (DirectDecode) against the model's own forward
# ---------------------------------------------------------------------------------------------------
def _direct_models():
    from tests._tiny_models import tiny_sliding

    return {
        "llama": lambda: tiny_llama(seed=2),
        "qwen2": lambda: tiny_qwen2(seed=2),  # q/k/v biases
        "llama-tied": lambda: tiny_llama(seed=2, tie_word_embeddings=True),
        "mistral": lambda: tiny_sliding("mistral", 4096),
    }


@pytest.mark.parametrize("arch", list(_direct_models()))
def test_direct_decode_gives_the_model_forwards_tokens_and_logprobs(arch):
    model = _direct_models()[arch]()
    ids, mask = ragged_prompts(5, max_len=P, seed=9)
    outs = []
    for direct in (False, True):
        gen = fastppo.Generator(model, max_batch_size=8, max_length=P + 12, direct_decode=direct)
        assert gen.direct_decode is direct
        for sampling in (dict(do_sample=False), dict(temperature=0.7), dict(top_k=20, top_p=0.9)):
            rng = torch.Generator().manual_seed(5)
            outs.append(gen.generate(ids, mask, max_new_tokens=12, eos_token_id=None, generator=rng, **sampling))
    for a, b in zip(outs[:3], outs[3:]):
        assert torch.equal(a.sequences, b.sequences)
        assert torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(outs[3].sequences, hf_greedy(model, ids, mask, 12))


def test_direct_decode_sees_weight_updates_and_falls_back_on_hooks():
    model = tiny_llama(seed=3)
    ids, mask = ragged_prompts(3, max_len=P, seed=4)
    gen = fastppo.Generator(model, max_batch_size=4, max_length=P + 6)
    assert gen.direct_decode  # the default on CPU

    def greedy():
        return gen.generate(ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None).sequences

    before = greedy()
    with torch.no_grad():  # an in-place update, as an optimizer step: the fused weights are rebuilt per call
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.mul_(2.0)
    after = greedy()
    assert not torch.equal(before, after)
    assert torch.equal(after, hf_greedy(model, ids, mask, 6))
    calls = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:  # a hook added after construction: the model's own forward, which runs it
        assert torch.equal(greedy(), after) and len(calls) == 1 + 5  # prefill + 5 decode steps
        with pytest.raises(ValueError, match="direct_decode=True"):
            fastppo.Generator(model, max_batch_size=4, max_length=P + 6, direct_decode=True)
    finally:
        handle.remove()
    assert not fastppo.Generator(model, max_batch_size=4, max_length=P + 6, compile=True).direct_decode


# ---------------------------------------------------------------------------------------------------
# sampling reproducibility, timing, side effects
# ---------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(models):
    model = models["qwen2"]
    ids, mask = ragged_prompts(3, max_len=P, seed=7)
    gen = fastppo.Generator(model, max_batch_size=4, max_length=24)

    def run(seed):
        return gen.generate(ids, mask, max_new_tokens=12, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    torch.manual_seed(3)
    d = gen.generate(ids, mask, max_new_tokens=12)
    torch.manual_seed(3)
    e = gen.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(d.sequences, e.sequences)
    assert a.prefill_seconds > 0 and a.decode_seconds > 0 and a.decode_steps == 11
    assert a.tokens_per_second == pytest.approx(a.num_tokens / (a.prefill_seconds + a.decode_seconds))


def test_model_state_is_restored(models):
    model = models["llama"]
    model.train()
    try:
        ids, mask = ragged_prompts(2, max_len=P)
        fastppo.Generator(model, max_batch_size=2, max_length=12).generate(ids, mask, max_new_tokens=3)
        assert model.training and model.config._attn_implementation == "sdpa"
    finally:
        model.eval()


def test_pack_padded_round_trip():
    ids, mask = ragged_prompts(4, max_len=P, seed=8)
    packed = pack_padded(ids, mask)
    lengths = mask.sum(-1)
    assert packed.input_ids.shape == (1, int(lengths.sum()))
    assert packed.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()] and packed.max_seqlen == P
    assert packed.position_ids[0, : int(lengths[0])].tolist() == list(range(int(lengths[0])))
    assert torch.equal(packed.unpack(packed.input_ids, fill=PAD_ID), ids)


def test_attn_implementation_choice_on_cpu():
    assert choose_attn_implementation("cpu") == "sdpa"
    assert not fastppo.attention.padding_free("cpu")


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_errors(models):
    model = models["llama"]
    gen = fastppo.Generator(model, max_batch_size=2, max_length=12)
    ids, mask = ragged_prompts(2, max_len=P)
    with pytest.raises(ValueError, match=r"prompt length 7 \+ max_new_tokens 6 = 13 exceeds max_length=12"):
        gen.generate(ids, mask, max_new_tokens=6)
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(ids, mask.flip(-1), max_new_tokens=2)
    empty = mask.clone()
    empty[0] = 0
    with pytest.raises(ValueError, match="row 0 has no real token"):
        gen.generate(ids, empty, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 128\)"):
        gen.generate(ids + 200, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        gen.generate(ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        gen.generate(ids.float(), mask, max_new_tokens=2)
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2, temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(max_new_tokens=2, top_k=-1), "top_k must be >= 0"),
        (dict(max_new_tokens=2, eos_token_id=list(range(9))), "at most 8"),
        (dict(max_new_tokens=2, eos_token_id=500), r"eos_token_id must be in \[0, 128\), got 500"),
        (dict(max_new_tokens=2, eos_token_id=1.0), "eos_token_id must be an int, a list"),
        (dict(max_new_tokens=2, eos_token_id=torch.tensor(1)), "eos_token_id must be an int, a list"),
        (dict(max_new_tokens=2, pad_token_id=-1), r"pad_token_id must be in \[0, 128\), got -1"),
        (dict(max_new_tokens=2, generator=0), "generator must be a torch.Generator"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer, got bool"),
        (dict(max_new_tokens=2, top_k=2.5), "top_k must be an integer, got float"),
        (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be > 0, got nan"),
        (dict(max_new_tokens=2, do_sample="yes"), "do_sample must be a bool, got str"),
        (dict(max_new_tokens=2, eos_token_id=True), "eos_token_id must be an integer, got bool"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            gen.generate(ids, mask, **kwargs)
    with pytest.raises(ValueError, match="input_ids is on meta but the model is on cpu"):
        gen.generate(ids.to("meta"), mask.to("meta"), max_new_tokens=2)
    for kwargs, match in [
        (dict(cuda_graphs="yes"), "cuda_graphs must be"),
        (dict(attention="xformers"), "attention must be"),
        (dict(prefill="chunked"), "prefill must be"),
        (dict(kv_block=0), "kv_block must be >= 1"),
        (dict(compile="yes"), "compile must be a bool"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            fastppo.Generator(model, max_batch_size=1, max_length=8, **kwargs)
    for kwargs, match in [
        (dict(max_batch_size=0), "max_batch_size must be >= 1"),
        (dict(max_batch_size=1.0), "max_batch_size must be an integer, got float"),
        (dict(max_length=1), "max_length must be >= 2"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            fastppo.Generator(model, **{"max_batch_size": 1, "max_length": 8, **kwargs})
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        fastppo.Generator(model, max_batch_size=1, max_length=8, cuda_graphs=True)
    with pytest.raises(ValueError, match="attention='flash' needs"):
        fastppo.Generator(model, max_batch_size=1, max_length=8, attention="flash")


def test_numpy_and_tensor_scalars_are_accepted(models):
    # every number and flag goes through one validator: numpy scalars and 0-dim tensors are numbers too
    import numpy as np

    model = models["qwen2"]
    ids, mask = ragged_prompts(3, max_len=P, seed=5)
    plain = dict(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, eos_token_id=EOS_ID)
    scalars = dict(
        max_new_tokens=torch.tensor(4),
        temperature=np.float32(0.7),
        top_k=np.int64(5),
        top_p=torch.tensor(0.9),
        eos_token_id=[np.int64(EOS_ID)],
        pad_token_id=np.int32(PAD_ID),
    )
    gen = fastppo.Generator(model, max_batch_size=np.int64(4), max_length=torch.tensor(16), check_every=np.int8(2))
    ref = gen.generate(ids, mask, generator=torch.Generator().manual_seed(0), **plain)
    out = gen.generate(ids, mask, generator=torch.Generator().manual_seed(0), **scalars)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.logprobs, ref.logprobs)
    assert gen.max_batch_size == 4 and type(gen.max_length) is int


def test_compiled_step_keeps_compiling_past_dynamo_limit(models):
    # With compile=True and no graphs, each new (bucket, key length, mode) is one more specialisation of
    # the compiled step; its first call must run with dynamo's recompile limit raised (default 8), or the
    # ninth would silently run eagerly. Recorded with a stand-in step (compiling for real takes minutes).
    model = models["qwen2"]
    ids, mask = ragged_prompts(3, max_len=P, seed=4)
    gen = fastppo.Generator(model, max_batch_size=4, max_length=40, kv_block=2)  # many key-length buckets
    seen = {}

    def step(*key):
        seen.setdefault(key, torch._dynamo.config.recompile_limit)
        return gen._step(*key)

    gen._step_fn = step
    gen.generate(ids, mask, max_new_tokens=20, do_sample=False)
    assert len(seen) > 8 and min(seen.values()) >= 1024


@pytest.mark.slow
def test_compiled_step_matches_eager(models):
    # compile=True for real (one specialisation: one bucket, one key length, greedy): the attention plans
    # are built and dispatched on inside the traced step without a graph break
    from torch._dynamo.utils import counters

    model = models["llama"]
    ids, mask = ragged_prompts(3, max_len=P, seed=13)
    kw = dict(max_batch_size=4, max_length=12, kv_block=12)
    ref = fastppo.Generator(model, **kw).generate(ids, mask, max_new_tokens=4, do_sample=False)
    counters.clear()
    out = fastppo.Generator(model, compile=True, **kw).generate(ids, mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)  # fused kernels round differently
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


# ---------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ---------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs(dtype):
    """Greedy: graphs == eager loop == HF (fp32); sampling: the call that captures the graphs and the call
    that replays them give the same tokens for the same seed."""
    model = tiny_qwen2(seed=2, dtype=dtype).cuda()
    ids, mask = (t.cuda() for t in ragged_prompts(5, max_len=P, seed=9))
    kw = dict(max_batch_size=8, max_length=40, check_every=2, kv_block=8)
    eager = fastppo.Generator(model, cuda_graphs=False, attention="sdpa", **kw)
    graphed = fastppo.Generator(model, cuda_graphs=True, **kw)
    eos = int(hf_greedy(model, ids, mask, 20)[0, P + 3])
    greedy = dict(max_new_tokens=20, eos_token_id=eos, do_sample=False)
    b = graphed.generate(ids, mask, **greedy)
    assert len(graphed._graphs) > 1 and b.capture_seconds > 0
    if dtype == torch.float32:
        assert torch.equal(b.sequences, eager.generate(ids, mask, **greedy).sequences)
        assert torch.equal(b.sequences, hf_greedy(model, ids, mask, 20, eos))
    sampled = [
        graphed.generate(
            ids,
            mask,
            max_new_tokens=20,
            eos_token_id=eos,
            temperature=0.8,
            top_k=20,
            generator=torch.Generator("cuda").manual_seed(0),
        )
        for _ in range(2)
    ]
    assert sampled[0].capture_seconds > 0 and sampled[1].capture_seconds == 0
    assert torch.equal(sampled[0].sequences, sampled[1].sequences)
    assert torch.equal(sampled[0].logprobs, sampled[1].logprobs)


@requires_cuda
def test_generator_on_another_device_than_the_model():
    # one draw from the caller's generator seeds the call, on the generator's own device
    for model_device, gen_device in (("cpu", "cuda"), ("cuda", "cpu")):
        model = tiny_llama(seed=4).to(model_device)
        ids, mask = (t.to(model_device) for t in ragged_prompts(3, max_len=P, seed=12))
        gen = fastppo.Generator(model, max_batch_size=4, max_length=16)
        runs = [
            gen.generate(ids, mask, max_new_tokens=6, generator=torch.Generator(gen_device).manual_seed(s)).sequences
            for s in (0, 0, 1)
        ]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@requires_cuda
def test_cuda_graph_sampling_reproducible():
    model = tiny_llama(seed=3, dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in ragged_prompts(4, max_len=P, seed=10))
    gen = fastppo.Generator(model, max_batch_size=4, max_length=48)
    runs = [
        gen.generate(ids, mask, max_new_tokens=32, generator=torch.Generator("cuda").manual_seed(s)).sequences
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with torch.no_grad():  # a replaced parameter tensor invalidates the graphs (they read old addresses)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
    again = gen.generate(ids, mask, max_new_tokens=32, generator=torch.Generator("cuda").manual_seed(0))
    assert again.capture_seconds > 0 and torch.equal(again.sequences, runs[0])


@requires_cuda
def test_cuda_graphs_under_autocast_and_deterministic_mode():
    # A caller's autocast (fp32 weights, bf16 compute) and deterministic mode around generate(): the
    # capture must neither read autocast's weight-cast cache (freed when the block exits) nor sync on the
    # host (deterministic index_put_). Replays after the autocast block has exited give the same tokens.
    model = tiny_qwen2(seed=5).cuda()
    ids, mask = (t.cuda() for t in ragged_prompts(4, max_len=P, seed=11))
    gen = fastppo.Generator(model, max_batch_size=4, max_length=32)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            first = gen.generate(ids, mask, max_new_tokens=12, do_sample=False)
            again = gen.generate(ids, mask, max_new_tokens=12, do_sample=False)
    finally:
        torch.use_deterministic_algorithms(det)
    assert first.capture_seconds > 0 and again.capture_seconds == 0
    assert torch.equal(first.sequences, again.sequences)
    torch.cuda.empty_cache()
    fp32 = gen.generate(ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None)  # autocast off: recaptured
    assert fp32.capture_seconds > 0
    assert torch.equal(fp32.sequences, hf_greedy(model, ids, mask, 12))
