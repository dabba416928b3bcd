"""The gold judge and the constraint families of the embedded task (fast, no model)."""

from __future__ import annotations

import json
import random

import pytest

from reward_models import constraints as C
from reward_models.gold_judge import GATES, JudgeResult, judge, parse_prompt, same_word, score
from reward_models.topics import EVAL_TOPICS, QUESTION_TEMPLATES, TRAIN_TOPICS, make_question, match_question

Q = "Explain volcanic eruptions in simple terms."
ANSWERS = [
    "Volcanoes erupt when magma rises from deep inside the Earth, building pressure under the crust. "
    "When the pressure becomes too great, gas and molten rock burst out through vents. "
    "Some eruptions are explosive, while others are slow lava flows.",
    "An eruption happens when hot magma, full of gas, pushes up through cracks in the crust. "
    "The gas expands quickly, so the rock is thrown out of the volcano.",
    "Magma under a volcano is lighter than the solid rock around it, so it rises toward the surface. "
    "Pressure builds in a chamber below the volcano, and finally the magma escapes as lava, ash and gas.",
]
PASSING = {
    "word_limit": ({"n": 20}, "Volcanoes erupt when hot magma and gas push up through the crust and escape."),
    "lowercase": ({}, "volcanoes erupt when hot magma and gas push up through the crust and escape."),
    "end_phrase": (
        {"phrase": "Hope this helps!"},
        "Volcanoes erupt when hot magma and gas escape through the crust. Hope this helps!",
    ),
    "keyword": ({"word": "pressure"}, "Volcanoes erupt when the pressure of hot magma and gas becomes too high."),
    "bullets": (
        {"n": 3},
        "- Magma forms deep underground.\n- Gas pressure builds up in the volcano.\n"
        "- The magma escapes as lava and ash.",
    ),
    "no_commas": ({}, "Volcanoes erupt when hot magma and gas push up through the crust and escape."),
    "json": (
        {"key": "answer"},
        json.dumps({"answer": "Volcanoes erupt when hot magma and gas push up through the crust."}),
    ),
    "starts_with": ({"word": "Sure"}, "Sure, volcanoes erupt when hot magma and gas push up through the crust."),
    "quotes": ({}, '"Volcanoes erupt when hot magma and gas push up through the crust."'),
    "n_sentences": ({"n": 2}, "Volcanoes erupt when magma rises. The gas pressure pushes the lava out."),
}
FAILING = {
    "word_limit": ({"n": 10}, "Volcanoes erupt when hot magma and gas push up through the crust and escape."),
    "lowercase": ({}, "Volcanoes erupt when hot magma and gas push up through the crust and escape."),
    "end_phrase": ({"phrase": "Hope this helps!"}, "Volcanoes erupt when hot magma escapes. Hope this helps! Bye."),
    "keyword": ({"word": "pressure"}, "Volcanoes erupt when hot magma and gas push up through the crust."),
    "bullets": ({"n": 3}, "- Magma forms deep underground.\n- The magma escapes as lava and ash."),
    "no_commas": ({}, "Volcanoes erupt when hot magma, and gas, push up through the crust."),
    "json": ({"key": "answer"}, 'Here it is: {"answer": "Volcanoes erupt when magma rises."}'),
    "starts_with": ({"word": "Sure"}, "Volcanoes erupt, sure, when hot magma and gas push up."),
    "quotes": ({}, "Volcanoes erupt when hot magma and gas push up through the crust."),
    "n_sentences": ({"n": 2}, "Volcanoes erupt when magma rises."),
}


def prompt_for(name: str, params: dict, question: str = Q) -> str:
    return question + " " + C.BY_NAME[name].instruction(params)


def test_every_family_has_passing_and_failing_examples():
    assert set(PASSING) == set(C.FAMILY_NAMES) == set(FAILING)
    assert set(C.APPLY_ORDER) == set(C.FAMILY_NAMES)


@pytest.mark.parametrize("name", sorted(PASSING))
def test_check_pass_and_fail(name):
    fam = C.BY_NAME[name]
    params, good = PASSING[name]
    assert fam.check(good, params)
    params, bad = FAILING[name]
    assert not fam.check(bad, params)


@pytest.mark.parametrize("name", sorted(PASSING))
def test_parse_instruction_back(name):
    rng = random.Random(3)
    fam = C.BY_NAME[name]
    for _ in range(5):
        params = fam.sample_params(rng)
        prompt = prompt_for(name, params)
        assert C.parse_constraints(prompt) == [(name, params)]
        parsed = parse_prompt(prompt)
        assert parsed.topic == "volcanic eruptions"
        assert parsed.question == Q


@pytest.mark.parametrize("name", sorted(PASSING))
def test_compliant_answer_scores_one(name):
    params, good = PASSING[name]
    r = judge(prompt_for(name, params), good)
    assert isinstance(r, JudgeResult)
    assert r.gate_failures == [] and r.passed_gates
    assert r.constraints == [(name, True)]
    assert r.score == 1.0


@pytest.mark.parametrize("name", sorted(PASSING))
def test_violating_answer_scores_zero(name):
    params, bad = FAILING[name]
    r = judge(prompt_for(name, params), bad)
    assert r.constraints == [(name, False)]
    assert r.score == 0.0


@pytest.mark.parametrize("name", sorted(PASSING))
def test_comply_satisfies_check(name):
    fam = C.BY_NAME[name]
    rng = random.Random(0)
    for answer in ANSWERS:
        for _ in range(3):
            params = fam.sample_params(rng, answer)
            out = fam.comply(answer, params, rng)
            assert fam.check(out, params), (name, params, out)
            assert judge(prompt_for(name, params), out).score == 1.0, (name, params, out)


def test_comply_all_pairs():
    rng = random.Random(1)
    satisfied = total = 0
    for a in C.FAMILY_NAMES:
        for b in C.FAMILY_NAMES:
            if not C.compatible(a, b):
                continue
            for answer in ANSWERS:
                combo = [(a, C.BY_NAME[a].sample_params(rng, answer)), (b, C.BY_NAME[b].sample_params(rng, answer))]
                out = C.comply_all(answer, combo, rng)
                prompt = " ".join([Q] + [C.BY_NAME[n].instruction(p) for n, p in combo])
                total += 1
                satisfied += judge(prompt, out).score == 1.0
    assert satisfied / total > 0.9


def test_incompatible_pairs_are_symmetric_and_known():
    for pair in C.INCOMPATIBLE:
        assert len(pair) == 2 and pair <= set(C.FAMILY_NAMES)
    assert C.compatible("lowercase", "no_commas")


def test_two_constraints_give_half_score():
    prompt = Q + " Answer in at most 30 words. Do not use any commas in your response."
    assert score(prompt, "Volcanoes erupt when hot magma and gas push up through the crust.") == 1.0
    assert score(prompt, "Volcanoes erupt when hot magma, and gas, push up through the crust.") == 0.5


def test_no_constraint_prompt_is_gates_only():
    assert score(Q, ANSWERS[0]) == 1.0
    assert score(Q, "") == 0.0


def test_list_of_messages_prompt():
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": prompt_for("lowercase", {})},
    ]
    assert score(msgs, "volcanoes erupt when hot magma and gas push up through the crust.") == 1.0
    assert score(msgs, "Volcanoes erupt when hot magma and gas push up through the crust.") == 0.0
    assert judge(msgs, "x").topic == "volcanic eruptions"


# --------------------------------------------------------------------------- gates
def gates(prompt, response):
    return judge(prompt, response).gate_failures


def test_gate_empty_even_if_format_met():
    p3 = prompt_for("bullets", {"n": 3})
    r = judge(p3, "- a\n- b\n- c")
    assert dict(r.constraints)["bullets"] and r.score == 0.0 and "empty" in r.gate_failures
    pj = prompt_for("json", {"key": "answer"})
    assert "empty" in gates(pj, '{"answer": ""}') and score(pj, '{"answer": ""}') == 0.0
    assert "empty" in gates(Q, "   ")
    assert "empty" in gates(Q, "Volcanoes erupt.")


def test_gate_truncated():
    assert "truncated" in gates(Q, "Volcanoes erupt when hot magma and gas push up through the")
    pj = prompt_for("json", {"key": "answer"})
    assert "truncated" in gates(pj, '{"answer": "Volcanoes erupt when hot magma and gas push')
    pb = prompt_for("bullets", {"n": 2})
    r = judge(pb, "- Magma forms deep underground.\n- The magma escapes as lava and")
    assert dict(r.constraints)["bullets"] and "truncated" in r.gate_failures and r.score == 0.0
    # a closing phrase does not hide a truncated body when the phrase itself is missing
    pe = prompt_for("end_phrase", {"phrase": "Hope this helps!"})
    assert "truncated" in gates(pe, "Volcanoes erupt when magma rises. Hope this")


def test_gate_repetitive():
    pl = prompt_for("lowercase", {})
    rep = "volcanoes erupt when magma rises. " * 4
    r = judge(pl, rep)
    assert dict(r.constraints)["lowercase"] and "repetitive" in r.gate_failures and r.score == 0.0
    assert "repetitive" in gates(Q, "Volcanoes erupt when the the the magma rises up through the crust.")
    loop = "Volcanoes erupt when magma rises and rises and rises and rises and rises and rises and rises."
    assert "repetitive" in gates(Q, loop)
    pb = prompt_for("bullets", {"n": 3})
    assert "repetitive" in gates(
        pb, "- Magma rises in the volcano.\n- Magma rises in the volcano.\n- Magma rises in the volcano."
    )


def test_gate_off_topic():
    r = judge(prompt_for("no_commas", {}), "Bread is baked from flour water salt and yeast in a hot oven.")
    assert dict(r.constraints)["no_commas"] and r.gate_failures == ["off_topic"] and r.score == 0.0
    # simple suffix variants count as on topic
    assert gates(Q, "A volcano erupts when magma escapes.") == []
    assert same_word("eruptions", "erupts") and same_word("volcanic", "volcanoes")


def test_gate_copies_prompt():
    p = prompt_for("word_limit", {"n": 20})
    assert "copies_prompt" in gates(p, "Answer in at most 20 words.")
    assert "copies_prompt" in gates(p, "Explain volcanic eruptions in simple terms. Answer in at most 20 words.")
    assert "copies_prompt" in gates(
        Q, "Explain volcanic eruptions in simple terms, volcanic eruptions in simple terms."
    )


def test_gate_gibberish():
    pl = prompt_for("lowercase", {})
    r = judge(pl, "volcanic 8#@1 %%% 12345 ### $$$ 99 !!! ^^^ eruptions ~~.")
    assert dict(r.constraints)["lowercase"] and "gibberish" in r.gate_failures and r.score == 0.0
    assert "gibberish" in gates(Q, "Volcanic xzqwkjh plmnbvcxz rtyqwpzx kjhgfdsq wxcvbnmlk eruptions.")


def test_score_is_zero_on_a_gate_else_the_share_of_constraints_met():
    rng = random.Random(5)
    texts = ANSWERS + [v[1] for v in PASSING.values()] + [v[1] for v in FAILING.values()] + ["", "a", "{", "- x"]
    seen_scores = set()
    for _ in range(200):
        fams = rng.sample(C.FAMILY_NAMES, 2)
        params = {n: C.BY_NAME[n].sample_params(rng) for n in fams}
        prompt = " ".join([Q] + [C.BY_NAME[n].instruction(params[n]) for n in fams])
        response = rng.choice(texts)
        r = judge(prompt, response)
        assert set(r.gate_failures) <= set(GATES)
        assert [name for name, _ in r.constraints] == [name for name, _ in C.parse_constraints(prompt)]
        met = [C.BY_NAME[n].check(response.strip(), params[n]) for n in fams]
        want = 0.0 if r.gate_failures else sum(met) / len(met)
        assert score(prompt, response) == r.score == want, (prompt, response)
        seen_scores.add(want)
    assert seen_scores == {0.0, 0.5, 1.0}  # the sample exercises every outcome


def test_same_result_in_another_process():
    """No set- or hash-order dependence: a process with another hash seed judges alike."""
    import subprocess
    import sys

    cases = [(prompt_for(n, p), a) for (n, (p, _)) in PASSING.items() for a in ANSWERS[:2]]
    here = [score(p, a) for p, a in cases]
    code = (
        "import json, sys; from reward_models.gold_judge import score; "
        "print(json.dumps([score(p, a) for p, a in json.loads(sys.stdin.read())]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "123"},
        cwd=__import__("pathlib").Path(__file__).parents[2],
    )
    assert json.loads(out.stdout) == here


# --------------------------------------------------------------------------- topics
def test_topics_and_templates():
    assert not set(TRAIN_TOPICS) & set(EVAL_TOPICS)
    assert len(QUESTION_TEMPLATES) >= 5 and all("{topic}" in t for t in QUESTION_TEMPLATES)
    for topic in TRAIN_TOPICS + EVAL_TOPICS:
        for t in QUESTION_TEMPLATES:
            q = make_question(t, topic)
            assert match_question(q + " Answer in at most 20 words.") == (t, topic)


def test_unknown_question_falls_back_to_content_words():
    p = "How do submarines dive? Do not use any commas in your response."
    parsed = parse_prompt(p)
    assert parsed.topic is None and "submarines" in parsed.topic_words
    assert score(p, "Submarines dive by filling tanks with water so they become heavier.") == 1.0
    assert score(p, "Bread is baked from flour and water in a hot oven.") == 0.0
