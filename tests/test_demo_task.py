"""The demo's sort-the-letters task: the true score, the generators' determinism, the held-out split."""

import pytest

from fastppo.trainer import demo_task as dt


def _letters(prompt: str) -> str:
    return "".join(sorted(prompt[len("sort ") : -len(": ")]))


def test_true_score_answer_empty_and_graded():
    p = "sort dbca: "
    assert dt.answer(p) == "abcd"
    assert dt.true_score(p, "abcd") == 1.0
    assert dt.true_score(p, "") == 0.0
    assert dt.true_score(p, "abc") == pytest.approx(0.75)  # one letter missing
    assert dt.true_score(p, "bacd") == pytest.approx(0.5)  # two neighbours swapped
    assert dt.true_score(p, "abcdx") == pytest.approx(0.8)  # one letter too many
    assert dt.true_score(p, "efgh") == 0.0
    # graded: fewer mistakes, higher score
    assert dt.true_score(p, "abcd") > dt.true_score(p, "abce") > dt.true_score(p, "abef") > dt.true_score(p, "efgh")


def test_reward_fn_is_the_true_score_and_ignores_columns():
    prompts = ["sort dbca: ", "sort jihg: "]
    assert dt.reward_fn(prompts, ["abcd", "ghi"], extra=[1, 2]) == [1.0, pytest.approx(0.75)]


@pytest.mark.parametrize("make", [dt.make_prompts, dt.demonstrations, dt.preference_pairs])
def test_generators_are_deterministic_under_a_seed(make):
    assert make(50, seed=3) == make(50, seed=3)
    assert make(50, seed=3) != make(50, seed=4)
    assert len(make(0, seed=3)) == 0


def test_prompts_are_well_formed_and_demonstrations_are_answers():
    for p, a in dt.demonstrations(100, seed=0):
        word = p[len("sort ") : -len(": ")]
        assert len(set(word)) == dt.WORD_LETTERS and set(word) <= set(dt.LETTERS)
        assert a == "".join(sorted(word)) and dt.true_score(p, a) == 1.0


def test_preference_pairs_chosen_scores_higher():
    for p, chosen, rejected in dt.preference_pairs(500, seed=0):
        assert dt.true_score(p, chosen) > dt.true_score(p, rejected)


def test_eval_split_is_disjoint_from_training_letter_sets():
    train = {_letters(p) for p in dt.make_prompts(3000, seed=0)}
    train |= {_letters(p) for p, _ in dt.demonstrations(3000, seed=1)}
    train |= {_letters(p) for p, _, _ in dt.preference_pairs(3000, seed=2)}
    held_out = {_letters(p) for p in dt.make_prompts(1000, seed=0, split="eval")}
    assert held_out and not train & held_out
    assert len(held_out) == 21 and len(train) == 189  # every set is drawn: 210 = C(10, 4)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="n"):
        dt.make_prompts(-1)
    with pytest.raises(ValueError, match="split"):
        dt.make_prompts(3, split="test")
    with pytest.raises(TypeError, match="seed"):
        dt.preference_pairs(3, seed=1.5)
    with pytest.raises(ValueError, match="prompt"):
        dt.true_score("sort it", "abc")
    with pytest.raises(TypeError, match="completion"):
        dt.true_score("sort abc: ", None)
    with pytest.raises(ValueError, match="prompts and completions"):
        dt.reward_fn(["sort abc: "], [])
