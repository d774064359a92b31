"""The built-in demo's synthetic task: **sort the letters of a word**, with a checkable true score.

A prompt is ``"sort <word>: "`` where ``<word>`` is 4 distinct letters from ``a`` to ``j``; the right
completion is those letters in alphabetical order (``"sort dbca: "`` -> ``"abcd"``), then EOS.

    train = make_prompts(512, seed=0)                   # PPO's prompts
    held_out = make_prompts(64, seed=1, split="eval")   # letter sets never seen in training
    sft_data = demonstrations(2400, seed=0)             # (prompt, answer) pairs for the warm-up
    pairs = preference_pairs(16000, seed=1)             # (prompt, chosen, rejected) for the reward model
    true_score("sort dbca: ", "abc")                    # 0.75: one letter missing from "abcd"

**The true score** is the normalised Levenshtein similarity to the answer,
``1 - edit_distance(completion, answer) / max(len(completion), len(answer))``: 1.0 for the answer,
0.0 for an empty completion, graded in between (one missing letter: 0.75; two neighbours
swapped: 0.5).

**Why this task.** RLHF optimises a *learned* reward: the reward model sees only preference pairs,
never the rule, and the policy is trained against the reward model's score. Here, unlike with a
real model, we can also compute the fact it stands for, so the demo reports both: the reward
model's score (what PPO optimises) and the true score (what we wanted). When they move together the
reward model has learned the preference; when the reward model's score rises faster than the true
score, the policy is exploiting the reward model's blind spots (reward hacking, which a KL leash to
the warm-up policy holds back). Every stage has something to show on a tiny char-level model within
seconds on a CPU:

* sorting is learnable but not instantly: a short supervised warm-up gets the format and part of
  the skill (sampled completions score about 0.4), leaving room for PPO;
* the preference is *graded* (letters in order, the word's letters, then stop), so the reward model
  learns to rank near-misses, not just "correct vs garbage";
* words have one length and ten possible letters, so a 2-layer reward model can check a completion
  against its prompt (it need not count, and has few letters to match) and PPO cannot win by writing
  any sorted-looking string; completions are a few tokens, so rollouts are cheap.

The preference pairs pair two candidate completions of one prompt with different true scores: the
answer, corruptions of it of graded severity (adjacent swaps, a dropped, doubled, substituted or
inserted letter, a truncation, a run-on without stopping), letters in order that are not the word's
(so that looking sorted is not enough: the first thing PPO exploits in a reward model that learned
only that), and the failure modes of an untrained policy (copying the prompt's word, the reverse
order, random letters, nothing). ``chosen`` is the one with the higher true score.

**Splits.** One letter set in ten (21 of the 210) is kept for ``split="eval"``: its words never
appear in the demonstrations, the preference pairs or the training prompts, so held-out scores
measure sorting, not recall.
"""

from __future__ import annotations

import itertools
import random
import re

from fastppo._checks import check_choice, check_number

LETTERS = "abcdefghij"
"""The alphabet of the words."""
WORD_LETTERS = 4
"""Letters per word (distinct)."""
MAX_NEW_TOKENS = WORD_LETTERS + 2
"""A completion budget that fits the answer plus its EOS, with one token to spare."""

_PROMPT = re.compile(r"sort ([a-z]+): \Z")
_SETS = ["".join(c) for c in itertools.combinations(LETTERS, WORD_LETTERS)]
_SPLITS = {"train": [c for i, c in enumerate(_SETS) if i % 10], "eval": _SETS[::10]}


def _word(rng: random.Random, split: str = "train") -> str:
    return "".join(rng.sample(rng.choice(_SPLITS[split]), WORD_LETTERS))


def _prompt(word: str) -> str:
    return f"sort {word}: "


def _rng(name: str, n, seed) -> tuple[int, random.Random]:
    n = check_number(name, n, ge=0, integer=True)
    return n, random.Random(check_number("seed", seed, integer=True))


def make_prompts(n: int, seed: int = 0, *, split: str = "train") -> list[str]:
    """``n`` task prompts ``"sort <word>: "`` drawn with ``random.Random(seed)`` (the same list for a seed),
    from the training letter sets or, with ``split="eval"``, from the held-out ones."""
    n, rng = _rng("n", n, seed)
    check_choice("split", split, tuple(_SPLITS))
    return [_prompt(_word(rng, split)) for _ in range(n)]


def answer(prompt: str) -> str:
    """The right completion of a task prompt: its word's letters in alphabetical order (no EOS)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"prompt must look like 'sort <lowercase letters>: ', got {prompt!r}")
    return "".join(sorted(match.group(1)))


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def true_score(prompt: str, completion: str) -> float:
    """``1 - edit_distance(completion, answer(prompt)) / max(len(completion), len(answer))``, in [0, 1].

    1.0 exactly for the answer, 0.0 for an empty completion. The completion is compared as given
    (decode it with ``skip_special_tokens=True``; whitespace counts).
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    target = answer(prompt)
    return 1.0 - _edit_distance(completion, target) / max(len(completion), len(target))


def reward_fn(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The true score as a reward function ``(prompts, completions, **columns) -> scores`` (extra
    columns are accepted and ignored): for baselines and tests, and to report the fact behind the
    reward model's score."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
        )
    return [true_score(p, c) for p, c in zip(prompts, completions)]


def demonstrations(n: int, seed: int = 0, *, split: str = "train") -> list[tuple[str, str]]:
    """``n`` ``(prompt, answer)`` pairs for the supervised warm-up (deterministic given ``seed``)."""
    return [(p, answer(p)) for p in make_prompts(n, seed, split=split)]


# --------------------------------------------------------------------------------------------------
# Preference pairs: the answer, graded corruptions of it, and the failure modes of an untrained policy
# --------------------------------------------------------------------------------------------------
def _other_letter(word: str, rng: random.Random) -> str:
    return rng.choice([c for c in LETTERS if c not in word])


def _local_edit(s: str, word: str, rng: random.Random) -> str:
    """One small corruption of ``s``: swap two neighbours, drop, double, substitute or insert a letter
    (a substituted or inserted letter is foreign to the word two times out of three)."""
    i = rng.randrange(max(len(s), 1))
    kind = rng.choice(("swap", "drop", "double", "substitute", "insert")) if s else "insert"
    letter = rng.choice(word) if rng.random() < 1 / 3 else _other_letter(word, rng)
    if kind == "swap" and len(s) > 1:
        i = min(i, len(s) - 2)
        return s[:i] + s[i + 1] + s[i] + s[i + 2 :]
    if kind == "drop":
        return s[:i] + s[i + 1 :]
    if kind == "double":
        return s[: i + 1] + s[i:]
    if kind == "substitute":
        return s[:i] + letter + s[i + 1 :]
    return s[:i] + letter + s[i:]


def _sorted_wrong(word: str, rng: random.Random) -> str:
    """Letters in order that are not (all) the word's: some replaced, added or left out, or another
    word's answer altogether. Well-formed, so a reward model must compare with the prompt to rank it."""
    if rng.random() < 0.25:
        return "".join(sorted(rng.sample(LETTERS, len(word))))
    letters = list(word)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("replace", "replace", "add", "leave out"))
        if op == "replace" or (op == "leave out" and len(letters) > 1):
            letters.pop(rng.randrange(len(letters)))
        if op != "leave out":
            letters.append(_other_letter(word, rng))
    return "".join(sorted(letters))


def _candidate(word: str, rng: random.Random) -> str:
    target = "".join(sorted(word))
    u = rng.random()
    if u < 0.15:
        return target
    if u < 0.23:  # the policy did not stop: a run-on after a (maybe corrupted) answer
        base = target if rng.random() < 0.5 else _local_edit(target, word, rng)
        return base + "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))
    if u < 0.3:
        return target[: rng.randrange(len(target))]  # stopped too early (possibly at once)
    if u < 0.45:  # what an untrained policy writes
        rough = rng.choice((word, target[::-1], "".join(rng.sample(word, len(word)))))
        rough = rough if rng.random() < 0.8 else "".join(rng.choice(LETTERS) for _ in range(len(word)))
        return rough if rng.random() < 0.5 else _local_edit(rough, word, rng)
    if u < 0.7:
        return _sorted_wrong(word, rng)
    s = target
    for _ in range(rng.choice((1, 1, 2, 2, 3))):
        s = _local_edit(s, word, rng)
    return s


def preference_pairs(n: int, seed: int = 0, *, split: str = "train") -> list[tuple[str, str, str]]:
    """``n`` ``(prompt, chosen, rejected)`` triples, ``true_score(prompt, chosen) > true_score(prompt, rejected)``.

    Each prompt gets two candidates (see the module docstring), redrawn until their true scores
    differ; ``chosen`` is the better one. Deterministic given ``seed``; ``split`` as in :func:`make_prompts`.
    """
    n, rng = _rng("n", n, seed)
    check_choice("split", split, tuple(_SPLITS))
    pairs = []
    while len(pairs) < n:
        word = _word(rng, split)
        prompt = _prompt(word)
        a, b = _candidate(word, rng), _candidate(word, rng)
        sa, sb = true_score(prompt, a), true_score(prompt, b)
        if sa != sb:
            pairs.append((prompt, a, b) if sa > sb else (prompt, b, a))
    return pairs


# --------------------------------------------------------------------------------------------------
# Scoring a policy on the task
# --------------------------------------------------------------------------------------------------
def complete(
    model,
    tokenizer,
    prompts: list[str],
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """Completions of ``prompts`` by a causal LM through :class:`fastppo.Generator` (stopping at the
    tokenizer's EOS), decoded without special tokens. Sampled with ``torch.Generator().manual_seed(seed)``
    (``do_sample=False``: greedy)."""
    import torch

    import fastppo

    if not prompts:
        return []
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    gen = fastppo.Generator(
        model, max_batch_size=min(len(prompts), batch_size), max_length=ids.shape[1] + max_new_tokens
    )
    out = gen.generate(
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    tokens = out.completions.masked_fill(~out.completion_mask, out.completions.new_tensor(0)).tolist()
    lengths = out.completion_mask.sum(-1).tolist()
    return tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True)


def evaluate_policy(model, tokenizer, prompts: list[str], *, do_sample: bool = True, seed: int = 0) -> dict:
    """The policy's true score on ``prompts``: ``{"true_score": mean, "exact": share of perfect answers,
    "completions": [...]}`` (sampled at temperature 1 with ``seed``, or greedy with ``do_sample=False``)."""
    completions = complete(model, tokenizer, prompts, do_sample=do_sample, seed=seed)
    scores = reward_fn(prompts, completions)
    return {
        "true_score": sum(scores) / max(len(scores), 1),
        "exact": sum(s == 1.0 for s in scores) / max(len(scores), 1),
        "completions": completions,
    }
