"""reward_models/constraints.py: the held-out phrasings parse to the training phrasings' constraints."""

import json

import pytest

from pipeline.artifacts import EMBEDDED_DATA
from reward_models.constraints import FAMILIES, HELD_OUT_PHRASINGS, parse_constraints, rephrase
from reward_models.gold_judge import judge


def rows(name):
    return [json.loads(line) for line in (EMBEDDED_DATA / name).read_text().splitlines()]


def user_text(row):
    return row["prompt"][-1]["content"]


def test_every_family_has_a_held_out_phrasing_that_parses_back():
    import random

    assert set(HELD_OUT_PHRASINGS) == {f.name for f in FAMILIES}
    for fam in FAMILIES:
        params = fam.sample_params(random.Random(0))
        training = f"Tell me about bread. {fam.instruction(params)}"
        held_out = rephrase(training)
        assert held_out != training and fam.instruction(params) not in held_out
        assert parse_constraints(held_out) == parse_constraints(training) == [(fam.name, params)]


def test_rephrased_split_is_the_evaluation_prompts_in_other_words():
    plain, other = rows("eval_prompts.jsonl"), rows("eval_prompts_rephrased.jsonl")
    assert len(plain) == len(other) == 250
    for a, b in zip(plain, other):
        assert user_text(b) == rephrase(user_text(a)) != user_text(a)
        assert parse_constraints(user_text(a)) == parse_constraints(user_text(b))


@pytest.mark.parametrize("name", ["sft_train.jsonl", "pref_train.jsonl", "ppo_prompts.jsonl"])
def test_no_training_prompt_uses_a_held_out_phrasing(name):
    patterns = [p for _, p in HELD_OUT_PHRASINGS.values()]
    assert not any(p.search(user_text(r)) for r in rows(name) for p in patterns)


def test_the_judge_scores_a_response_alike_under_both_phrasings():
    prompt = 'Tell me about bread. Answer in at most 12 words. Include the word "crust" in your response.'
    other = rephrase(prompt)
    for response in ["Bread has a crisp crust and a soft crumb inside.", "Bread is baked from flour and water."]:
        a, b = judge(prompt, response), judge(other, response)
        assert (a.score, a.constraints) == (b.score, b.constraints)
    assert judge(other, "Bread has a crisp crust and a soft crumb inside.").score == 1.0
    assert judge(other, "Bread is baked from flour and water.").score == 0.5
