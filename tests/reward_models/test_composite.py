"""reward_models/composite.py: ensemble aggregation (hand-computed), rule functions and their one-line errors."""

import math

import pytest
import torch

from pipeline.errors import PipelineError
from reward_models.composite import CompositeReward, aggregate, load_reward_func, rule_scores

SCORES = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # 2 members x 3 responses


@pytest.mark.parametrize(
    "how, coef, expected",
    [
        ("mean", 1.0, [2.0, 0.0, 0.0]),
        ("min", 1.0, [1.0, 0.0, -2.0]),
        # population std over the two members: |a - b| / 2 = 1, 0, 2
        ("mean_minus_std", 1.0, [1.0, 0.0, -2.0]),
        ("mean_minus_std", 0.5, [1.5, 0.0, -1.0]),
    ],
)
def test_aggregate_by_hand(how, coef, expected):
    assert aggregate(SCORES, how, coef).tolist() == expected


@pytest.mark.parametrize("how", ["mean", "min", "mean_minus_std"])
def test_one_member_is_its_own_score(how):
    assert aggregate(SCORES[:1], how, 3.0).tolist() == SCORES[0].tolist()


def test_aggregate_refuses_unknown_rule_and_shape():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(SCORES, "max")
    with pytest.raises(ValueError, match="members, responses"):
        aggregate(SCORES[0], "mean")


def word_count_rule(prompt, response):
    return float(len(response.split()))


def raising_rule(prompt, response):
    raise KeyError("no such field")


def nan_rule(prompt, response):
    return float("nan")


def text_rule(prompt, response):
    return "good"


def test_load_reward_func_resolves_module_and_function():
    assert load_reward_func(f"{__name__}:word_count_rule") is word_count_rule
    assert load_reward_func("math:sqrt") is math.sqrt


@pytest.mark.parametrize(
    "spec, message",
    [
        ("word_count_rule", "write it as package.module:function"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        (f"{__name__}:missing", "has no missing"),
        (f"{__name__}:SCORES", "is not callable"),
    ],
)
def test_load_reward_func_errors_are_one_line(spec, message):
    with pytest.raises(PipelineError, match=message) as e:
        load_reward_func(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fn, message",
    [
        (raising_rule, "reward function R raised KeyError on response 0"),
        (nan_rule, "reward function R returned nan on response 0; return a finite float"),
        (text_rule, "reward function R returned 'good' on response 0; return a float"),
    ],
)
def test_rule_failures_name_the_function(fn, message):
    with pytest.raises(PipelineError) as e:
        rule_scores("R", fn, [[{"role": "user", "content": "q"}]], ["an answer"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_composite_adds_weighted_rules_to_the_aggregated_members():
    members = [lambda p, r: SCORES[0], lambda p, r: SCORES[1]]
    prompts = [[{"role": "user", "content": "q"}]] * 3
    responses = ["one", "one two", "one two three"]
    reward = CompositeReward(members, "min", 1.0, [("wc", word_count_rule)], [0.5])
    # min over members [1, 0, -2] + 0.5 * words [1, 2, 3]
    assert reward(prompts, responses).tolist() == [1.5, 1.0, -0.5]
    assert reward.last_components["rules"].tolist() == [[1.0, 2.0, 3.0]]
    rules_only = CompositeReward([], funcs=[("wc", word_count_rule), ("wc2", word_count_rule)], weights=[1.0, -1.0])
    assert rules_only(prompts, responses).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 weights for 1 reward functions"):
        CompositeReward(members, funcs=[("wc", word_count_rule)], weights=[1.0, 2.0])
