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
    for name in list(MIN_ROWS) + ["base_answers.jsonl", "README.md"]:
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


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_test.jsonl"])
def test_pairs_are_ordered_by_the_judge(data, name):
    n_gate = 0
    for r in data[name]:
        c = judge(r["prompt"], text_of(r["chosen"]))
        rj = judge(r["prompt"], text_of(r["rejected"]))
        assert c.score == 1.0, r
        assert c.score > rj.score, r
        n_gate += not rj.passed_gates
    share = n_gate / len(data[name])
    assert 0.1 <= share <= 0.3, share


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_test.jsonl"])
def test_no_length_cue(data, name):
    cw = sum(word_count(text_of(r["chosen"])) for r in data[name])
    rw = sum(word_count(text_of(r["rejected"])) for r in data[name])
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
