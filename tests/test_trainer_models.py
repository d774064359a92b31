"""The trainer's models: log-prob head (against full logits), value model, reference, no [N, V] saved."""

import pytest
import torch

import fastppo
from fastppo.tiny import EOS_ID, PAD_ID, tiny_llama, tiny_qwen2, tiny_reward_model, tiny_tokenizer
from fastppo.trainer.models import LogProbHead, Reference, ValueModel, completion_logprobs, position_ids
from fastppo.trainer.rewards import RewardModel
from tests._trainer_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 211  # a vocabulary size no other dimension of the tiny models has


def _rollout(model, *, temperature=1.0, new=6, seed=0):
    """A seeded rollout in which row 0 stops early: its third token is made the EOS id, and the same
    seed gives the same tokens up to there."""
    tok = tiny_tokenizer()
    batch = tok(["Hi ", "Once upon", "x", "la la la "], return_tensors="pt", padding=True)
    gen = fastppo.Generator(model, max_batch_size=4, max_length=batch.input_ids.shape[1] + new)

    def generate(eos):
        return gen.generate(
            batch.input_ids,
            batch.attention_mask,
            max_new_tokens=new,
            temperature=temperature,
            eos_token_id=eos,
            pad_token_id=PAD_ID,
            generator=torch.Generator().manual_seed(seed),
        )

    stop = int(generate(None).completions[0, 2])
    return generate([EOS_ID, stop]), batch.attention_mask


def _naive(model, out, prompt_mask, temperature):
    """The textbook way: full logits, log_softmax, gather (what the head must equal)."""
    P = out.prompt_length
    mask = torch.cat([prompt_mask.bool(), out.completion_mask], 1)
    logits = model(input_ids=out.sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)
    lp = logp.gather(-1, out.sequences[:, P:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    m = out.completion_mask
    return lp * m, ent * m


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", [tiny_qwen2, tiny_llama])
def test_completion_logprobs_equal_full_logits_and_the_generator(arch, tied):
    model = arch(V, seed=1, tie_word_embeddings=tied)
    out, prompt_mask = _rollout(model, temperature=0.7)
    assert not out.completion_mask.all()  # some rows stopped early: the padding is exercised
    lp, ent = completion_logprobs(model, out, prompt_mask, temperature=0.7)
    ref_lp, ref_ent = _naive(model, out, prompt_mask, 0.7)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    # the Generator's sampling log-probs and the training recompute agree to rounding in fp32
    diff = ((out.logprobs - lp).abs() * out.completion_mask).sum() / out.completion_mask.sum()
    assert diff < 1e-5, diff
    # gradients reach the output embedding (for tied models: the input embedding it is)
    lp.sum().backward()
    weight = model.get_output_embeddings().weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    if tied:
        assert model.get_input_embeddings().weight.grad is weight.grad


def test_head_rejects_models_whose_logits_are_changed_after_the_lm_head():
    model = tiny_qwen2(V)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LogProbHead(model)


def test_value_model_from_policy_starts_at_zero_and_from_reward_model_reads_its_score():
    policy = tiny_qwen2(V, seed=1)
    out, prompt_mask = _rollout(policy)
    mask = torch.cat([prompt_mask.bool(), out.completion_mask], 1)
    critic = ValueModel.from_policy(policy)
    values = critic(out.sequences, mask, out.prompt_length)
    assert values.shape == out.completion_mask.shape and values.dtype == torch.float32
    assert torch.all(values == 0)
    assert critic.body is not policy.model  # a copy: training it leaves the policy alone

    rm = tiny_reward_model(V, seed=2)
    critic = ValueModel.from_reward_model(rm)
    values = critic(out.sequences, mask, out.prompt_length)
    # the first value is the state after the prompt: the reward model's score of the prompt alone
    prompts = [row[m].tolist() for row, m in zip(out.sequences[:, : out.prompt_length], prompt_mask.bool())]
    scores = RewardModel(rm, tiny_tokenizer(), same_tokenizer=True)(["" for _ in prompts], prompts)
    torch.testing.assert_close(values[:, 0], scores, rtol=1e-5, atol=1e-5)


def test_reference_is_a_frozen_copy_or_the_given_model():
    policy = tiny_qwen2(V, seed=1)
    out, prompt_mask = _rollout(policy)
    mask = torch.cat([prompt_mask.bool(), out.completion_mask], 1)
    ref = Reference(policy)
    before = ref.logprobs(out.sequences, mask, out.prompt_length, completion_mask=out.completion_mask)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = ref.logprobs(out.sequences, mask, out.prompt_length, completion_mask=out.completion_mask)
    assert torch.equal(before, after) and not after.requires_grad
    assert not any(p.requires_grad for p in ref.model.parameters())
    given = tiny_qwen2(V, seed=5)
    assert Reference(policy, given).model is given


def test_reference_under_peft_disables_the_adapters():
    peft = pytest.importorskip("peft")
    base = tiny_qwen2(V, seed=1)
    out, prompt_mask = _rollout(base)
    mask = torch.cat([prompt_mask.bool(), out.completion_mask], 1)
    plain, _ = completion_logprobs(base, out, prompt_mask)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ref = Reference(model)
    assert ref.model is model  # no second copy of the weights
    lp = ref.logprobs(out.sequences, mask, out.prompt_length, completion_mask=out.completion_mask)
    torch.testing.assert_close(lp, plain.detach())
    adapted, _ = completion_logprobs(model, out, prompt_mask)
    assert not torch.allclose(adapted, plain)


def _saved_logit_shaped(fn, model, n_tokens):
    """Shapes of the tensors autograd saves during ``fn()`` that look like logits: a dim of V and at
    least ``n_tokens`` rows, not a view of a parameter."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and V in t.shape and t.numel() >= n_tokens * V:
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return found


def test_no_logits_are_saved_for_backward_in_a_training_step(tmp_path):
    from tests._trainer_helpers import PROMPTS, small_config, vowels

    tok = tiny_tokenizer()
    policy = tiny_qwen2(V, seed=1)
    cfg = small_config(tmp_path, num_minibatches=1, advantage="gae")
    trainer = fastppo.PPOTrainer(cfg, policy, tok, vowels, train_prompts=PROMPTS)
    roll = trainer._rollout(trainer.sampler.next(), trainer.sample_rng, do_sample=True, samples=2)
    exp, info = trainer._prepare(roll, trainer._score(roll)[0])
    n = int(exp.completion_mask.sum())
    found = _saved_logit_shaped(lambda: trainer._update(exp, info["kl_coef"]), policy, n)
    assert found == [], found
    # the check can fail: the textbook full-logits loss saves [B, N, V] tensors
    naive = _saved_logit_shaped(
        lambda: (
            torch.log_softmax(policy(input_ids=exp.sequences, attention_mask=exp.attention_mask).logits.float(), -1)
            .sum()
            .backward()
        ),
        policy,
        n,
    )
    assert naive, "the hook missed the naive [B, L, V] logits"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_precomputed_sdpa_mask_gives_the_models_own_outputs_and_gradients(arch):
    """hidden_states passes a 4D additive mask on the CPU (sdpa_mask): the forward and the gradients are
    those of the model's own 2D-mask path, exactly; without padding the model's path is kept."""
    from transformers.masking_utils import create_causal_mask

    from fastppo.trainer.models import decoder_of, hidden_states, sdpa_mask

    model = (tiny_llama if arch == "llama" else tiny_qwen2)(seed=3)
    body = decoder_of(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 128, (5, 12), generator=g)
    mask = torch.ones(5, 12, dtype=torch.bool)
    for i, pad in enumerate([0, 3, 7, 1, 11]):
        mask[i, :pad] = False
    full = sdpa_mask(body, mask)
    assert full is not None and full.shape == (5, 1, 12, 12)
    emb = body.get_input_embeddings()(ids)
    hf = create_causal_mask(
        config=body.config, inputs_embeds=emb, attention_mask=mask, cache=None, position_ids=position_ids(mask)
    )
    assert torch.equal(full == 0, hf)
    assert sdpa_mask(body, torch.ones(5, 12, dtype=torch.bool)) is None

    def run(fn):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            h = fn()
            h[mask].square().sum().backward()
        return h.detach(), [p.grad.clone() for p in body.parameters()]

    from fastppo.trainer.models import _plain_body

    assert _plain_body(body)  # the layers are called one by one (_layers_forward), not body.forward
    ours = run(lambda: hidden_states(body, ids, mask))
    theirs = run(lambda: body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state)
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))
    calls = []
    body.register_forward_hook(lambda *a: calls.append(1))  # a hook on the body: its own forward runs again
    assert not _plain_body(body)
    assert torch.equal(run(lambda: hidden_states(body, ids, mask))[0], theirs[0]) and calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_last_layer_on_the_kept_positions_only_gives_the_full_forwards_rows(arch):
    """hidden_states(keep=...) runs the last decoder layer for those query positions only (_last_layer):
    the rows and the gradients of a loss on them are the full forward's, to float32 rounding."""
    from fastppo.trainer.models import _plain_layer, decoder_of, hidden_states

    model = (tiny_llama if arch == "llama" else tiny_qwen2)(seed=4)
    body = decoder_of(model)
    assert _plain_layer(body.layers[-1], arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (4, 14), generator=g)
    mask = torch.ones(4, 14, dtype=torch.bool)
    for i, pad in enumerate([0, 5, 2, 9]):
        mask[i, :pad] = False
    for keep in (slice(8, -1), slice(-1, None)):

        def run(fn):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                h = fn()
                (h.square() * torch.linspace(0.5, 2, h.shape[-1])).sum().backward()
            return h.detach(), [p.grad.clone() for p in body.parameters()]

        kept = run(lambda keep=keep: hidden_states(body, ids, mask, keep=keep))
        full = run(lambda keep=keep: hidden_states(body, ids, mask)[:, keep])
        assert kept[0].shape == full[0].shape
        torch.testing.assert_close(kept[0], full[0], atol=1e-6, rtol=1e-6)
        moved = 0
        for a, b in zip(kept[1], full[1]):
            torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()) + 1e-9, rtol=1e-5)  # sums reordered
            moved += int(b.abs().max() > 0)
        assert moved == len(kept[1])  # every parameter, the last layer's included, got its gradient
    body.layers[-1].register_forward_hook(lambda *a: None)  # a hook: the layer runs as a module again
    assert not _plain_layer(body.layers[-1], arch)
