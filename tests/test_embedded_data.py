"""The shipped data sets of the embedded task (fast, no model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from reward_models import constraints as C
from reward_models.gold_judge import judge, parse_prompt, word_count
from reward_models.topics import EVAL_TOPICS, TRAIN_TOPICS

DATA = Path(__file__).resolve().parents[1] / "data" / "embedded"
MIN_ROWS = {
    "sft_train.jsonl": 1000,
    "pref_train.jsonl": 2000,
    "pref_test.jsonl": 300,
    "ppo_prompts.jsonl": 500,
    "eval_prompts.jsonl": 200,
}
KEYS = {
    "sft_train.jsonl": {"prompt", "completion"},
    "pref_train.jsonl": {"prompt", "chosen", "rejected"},
    "pref_test.jsonl": {"prompt", "chosen", "rejected"},
    "ppo_prompts.jsonl": {"prompt"},
    "eval_prompts.jsonl": {"prompt"},
}


def load(name: str) -> list[dict]:
    with (DATA / name).open() as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: load(name) for name in MIN_ROWS}


def text_of(messages: list[dict]) -> str:
    return messages[-1]["content"]


def test_files_exist():
    for name in list(MIN_ROWS) + ["base_answers.jsonl", "policy_samples.jsonl", "README.md"]:
        assert (DATA / name).is_file(), name


def test_sizes_and_format(data):
    for name, rows in data.items():
        assert len(rows) >= MIN_ROWS[name], name
        for r in rows:
            assert set(r) == KEYS[name], name
            assert isinstance(r["prompt"], list) and len(r["prompt"]) == 1
            assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].strip()
            for k in KEYS[name] - {"prompt"}:
                assert isinstance(r[k], list) and len(r[k]) == 1
                assert r[k][0]["role"] == "assistant" and r[k][0]["content"].strip()


def test_every_prompt_has_one_or_two_known_constraints(data):
    for name, rows in data.items():
        for r in rows:
            parsed = parse_prompt(text_of(r["prompt"]))
            assert 1 <= len(parsed.constraints) <= 2, (name, r["prompt"])
            names = [n for n, _ in parsed.constraints]
            assert len(names) == 1 or C.compatible(*names), (name, names)
            assert parsed.topic is not None, (name, r["prompt"])


def test_sft_completions_score_one(data):
    for r in data["sft_train.jsonl"]:
        res = judge(r["prompt"], text_of(r["completion"]))
        assert res.score == 1.0, (r, res)
        assert word_count(text_of(r["completion"])) <= 70


@pytest.fixture(scope="module")
def policy_samples() -> dict[str, set[str]]:
    """The cached SFT-model samples behind the on-policy pairs: prompt text -> responses."""
    out: dict[str, set[str]] = {}
    for r in load("policy_samples.jsonl"):
        out.setdefault(text_of(r["prompt"]), set()).add(r["response"].strip())
    return out


def is_onpolicy(r: dict, policy_samples) -> bool:
    return text_of(r["chosen"]) in policy_samples.get(text_of(r["prompt"]), ())


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_test.jsonl"])
def test_pairs_are_ordered_by_the_judge(data, policy_samples, name):
    n_gate = n_synthetic = 0
    for r in data[name]:
        c = judge(r["prompt"], text_of(r["chosen"]))
        rj = judge(r["prompt"], text_of(r["rejected"]))
        assert c.score > rj.score, r
        if not is_onpolicy(r, policy_samples):  # built pairs: the chosen answer meets every constraint
            assert c.score == 1.0, r
            n_gate += not rj.passed_gates
            n_synthetic += 1
    share = n_gate / n_synthetic
    assert 0.1 <= share <= 0.3, share


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_test.jsonl"])
def test_onpolicy_pairs_are_the_policy_samples(data, policy_samples, name):
    onpolicy = [r for r in data[name] if is_onpolicy(r, policy_samples)]
    assert len(onpolicy) >= 0.1 * len(data[name]), len(onpolicy)
    for r in onpolicy:
        assert text_of(r["rejected"]) in policy_samples[text_of(r["prompt"])], r
        assert text_of(r["chosen"]) != text_of(r["rejected"])


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_test.jsonl"])
def test_no_length_cue(data, policy_samples, name):
    """In the built pairs chosen and rejected come from the same base answer; sampled pairs are as they came."""
    built = [r for r in data[name] if not is_onpolicy(r, policy_samples)]
    cw = sum(word_count(text_of(r["chosen"])) for r in built)
    rw = sum(word_count(text_of(r["rejected"])) for r in built)
    assert 0.85 <= cw / rw <= 1.15


def test_families_are_mixed(data):
    for name, rows in data.items():
        counts = Counter(n for r in rows for n, _ in parse_prompt(text_of(r["prompt"])).constraints)
        assert set(counts) == set(C.FAMILY_NAMES), name
        assert min(counts.values()) >= 0.4 * max(counts.values()), (name, counts)


def test_topics_split(data):
    assert not set(TRAIN_TOPICS) & set(EVAL_TOPICS)
    for name, rows in data.items():
        topics = {parse_prompt(text_of(r["prompt"])).topic for r in rows}
        expected = set(EVAL_TOPICS) if name == "eval_prompts.jsonl" else set(TRAIN_TOPICS)
        assert topics <= expected, (name, topics - expected)


def test_eval_prompts_unseen(data):
    eval_prompts = {text_of(r["prompt"]) for r in data["eval_prompts.jsonl"]}
    for name, rows in data.items():
        if name == "eval_prompts.jsonl":
            continue
        seen = {text_of(r["prompt"]) for r in rows}
        assert not eval_prompts & seen, name


def test_pref_test_base_answers_not_in_train(data):
    def question(r):
        return parse_prompt(text_of(r["prompt"])).question

    train_q = {question(r) for r in data["pref_train.jsonl"]} | {question(r) for r in data["sft_train.jsonl"]}
    test_q = {question(r) for r in data["pref_test.jsonl"]}
    assert not train_q & test_q


def _make_data_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_embedded_data.py"
    spec = importlib.util.spec_from_file_location("make_embedded_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_onpolicy_pairs_rank_by_judge_and_drop_ties_and_repeats():
    """Pairs of distinct responses (after stripping) with different judge scores, the better one chosen;
    ties and a prompt with a single distinct response give none; at most ``pairs_per_prompt`` per prompt."""
    import random

    med = _make_data_module()
    prompt = [
        {
            "role": "user",
            "content": "What are the key facts about volcanoes? Your entire response should be in lowercase letters.",
        }
    ]
    good = "volcanoes are openings in the crust where molten rock reaches the surface."  # 1.0
    good_too = "volcanoes form where tectonic plates meet and magma rises to the surface."  # 1.0: a tie with good
    wrong = "Volcanoes are openings in the crust where molten rock reaches the surface."  # 0.0: not lowercase
    stub = "volcanoes."  # 0.0: too short
    assert [judge(prompt, x).score for x in (good, good_too, wrong, stub)] == [1.0, 1.0, 0.0, 0.0]
    samples = [{"prompt_id": 0, "prompt": prompt, "response": x} for x in (good, good + " ", good_too, wrong, stub)]
    samples.append({"prompt_id": 1, "prompt": prompt, "response": good})  # one distinct response: no pair
    for seed in range(5):
        rows = med.build_onpolicy_pairs(samples, random.Random(seed), pairs_per_prompt=10)
        pairs = {(text_of(r["chosen"]), text_of(r["rejected"])) for r in rows}
        assert len(rows) == 4 and pairs == {(c, x) for c in (good, good_too) for x in (wrong, stub)}
        assert all(r["prompt"] == prompt for r in rows)
        capped = med.build_onpolicy_pairs(samples, random.Random(seed), pairs_per_prompt=3)
        assert len(capped) == 3 and {(text_of(r["chosen"]), text_of(r["rejected"])) for r in capped} < pairs


def test_policy_samples_are_cached_with_their_source(tiny_artifacts, tmp_path):
    """``--policy``: every prompt gets its responses (EOS cut off), written with the policy and settings."""
    med = _make_data_module()
    prompts = [
        {"prompt": [{"role": "user", "content": f"Tell me about rain, take {i}. Use no commas."}]} for i in range(3)
    ]
    policy = str(tiny_artifacts / "sft" / "model")
    out = tmp_path / "samples.jsonl"
    rows = med.sample_policy_answers(
        out, policy, prompts, n_per_prompt=2, batch_size=4, max_new_tokens=6, temperature=1.0, seed=0
    )
    assert [r["prompt_id"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert all(r["prompt"] == prompts[r["prompt_id"]]["prompt"] and isinstance(r["response"], str) for r in rows)
    cached = med.load_jsonl(out)
    assert [r["response"] for r in cached] == [r["response"] for r in rows]
    assert all(r["policy"] == "sft/model" and r["temperature"] == 1.0 and r["seed"] == 0 for r in cached)
    again = med.sample_policy_answers(tmp_path / "again.jsonl", policy, prompts, 2, 4, 6, 1.0, 0)
    assert [r["response"] for r in again] == [r["response"] for r in rows]  # seeded


def test_scarce_setting_keeps_sft_questions_away_from_the_reward_model_and_ppo(data):
    """Setting (b): SFT gets at most a fifth of the demonstrations; the reward model's comparisons and PPO's prompts
    come from the other questions only, and every scarce row is a row of its full file."""
    sft, pref, ppo = load("sft_scarce.jsonl"), load("pref_scarce.jsonl"), load("ppo_prompts_scarce.jsonl")
    assert 0.15 * len(data["sft_train.jsonl"]) <= len(sft) <= 0.2 * len(data["sft_train.jsonl"])
    question = lambda r: parse_prompt(text_of(r["prompt"])).question  # noqa: E731
    sft_q = {question(r) for r in sft}
    assert not sft_q & {question(r) for r in pref} and not sft_q & {question(r) for r in ppo}
    for scarce, full in ((sft, "sft_train.jsonl"), (pref, "pref_train.jsonl"), (ppo, "ppo_prompts.jsonl")):
        rows = {json.dumps(r, sort_keys=True) for r in data[full]}
        assert all(json.dumps(r, sort_keys=True) in rows for r in scarce), full
    # What the scarce setting removes from the reward model's data is only what shares a question with SFT.
    assert len(pref) == sum(question(r) not in sft_q for r in data["pref_train.jsonl"])
    assert len(pref) >= 0.7 * len(data["pref_train.jsonl"]) and len(ppo) >= 0.8 * len(data["ppo_prompts.jsonl"])
