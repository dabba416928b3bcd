"""pipeline.eval_report: aggregation numbers, report.json/md/html contents, escaping, no-gold path."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval_report import aggregate, summary_table, write_reports

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
N = 20
EVIL = 'Sure! <script>alert("x")</script> & <b>bold</b> | pipe\nsecond line'
EVIL_PROMPT = 7


def _block(rng, n, reward_shift, gold_shift, length, eos_p, kl, words, with_kl=True):
    responses = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 4)) for i in range(n)]
    block = {
        "responses": responses,
        "reward": (rng.normal(0, 0.5, n) + reward_shift).round(3).tolist(),
        "gold": np.clip(rng.normal(0, 0.15, n) + gold_shift, 0, 1).round(3).tolist(),
        "length": [int(length + i % 5) for i in range(n)],
        "eos": [bool(i / n < eos_p) for i in range(n)],
    }
    if with_kl:
        block["kl_to_sft"] = (np.abs(rng.normal(kl, 0.2 * kl + 1e-9, n))).round(4).tolist() if kl else [0.0] * n
    return block


def make_results(has_gold: bool = True, with_ppo: bool = True, n: int = N) -> dict:
    """base, sft, ppo-iter-000010, ppo-iter-000020, ppo: reward keeps rising with KL, gold peaks then falls."""
    rng = np.random.default_rng(0)
    words = "the model answers every question with care and some detail".split()
    spec = [  # name, kind, iteration, reward, gold, length, eos, kl, greedy?
        ("base", "base", None, -0.5, 0.40, 60, 0.6, 3.0, True),
        ("sft", "sft", None, 0.0, 0.55, 40, 0.9, 0.0, True),
        ("ppo-iter-000010", "ppo_checkpoint", 10, 0.6, 0.65, 35, 0.95, 2.0, False),
        ("ppo-iter-000020", "ppo_checkpoint", 20, 1.0, 0.60, 33, 0.95, 5.0, True),
        ("ppo", "ppo", 30, 1.5, 0.50, 30, 1.0, 9.0, True),
    ]
    if not with_ppo:
        spec = spec[:2]
    cks = {}
    for name, kind, it, r, g, length, eos, kl, greedy in spec:
        s = _block(rng, n, r, g, length, eos, kl, words)
        gr = _block(rng, n, r + 0.1, g, length - 5, eos, kl, words, with_kl=False) if greedy else None
        if not has_gold:
            s["gold"] = None
            if gr:
                gr["gold"] = None
        cks[name] = {
            "kind": kind,
            "iteration": it,
            "path": f"artifacts/ppo/checkpoints/{name}",
            "sampled": s,
            "greedy": gr,
        }
    cks["base"]["sampled"]["responses"] = ["the cat sat"] * n  # distinct-2 = 2 / (2 n)
    if with_ppo:  # plant the biggest PPO-over-SFT gain on one prompt, with HTML in the response
        cks["ppo"]["sampled"]["responses"][EVIL_PROMPT] = EVIL
        cks["ppo"]["sampled"]["reward"][EVIL_PROMPT] = 9.0
        cks["sft"]["sampled"]["reward"][EVIL_PROMPT] = -9.0
        if has_gold:
            cks["ppo"]["sampled"]["gold"][EVIL_PROMPT] = 1.0
            cks["sft"]["sampled"]["gold"][EVIL_PROMPT] = 0.0
    prompts = [f"Tell me about topic {i} <i>please</i>." for i in range(n)]
    return {
        "config": {"task": "embedded", "seed": 0, "eval": {"num_prompts": n, "max_new_tokens": 64}},
        "prompts": prompts,
        "has_gold": has_gold,
        "checkpoints": cks,
    }


def _hand_win_rate(a, b):
    return float(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def results():
    return make_results()


@pytest.fixture(scope="module")
def report(results):
    return aggregate(results, n_boot=500, seed=0)


@pytest.fixture(scope="module")
def written(report, results, tmp_path_factory):
    return write_reports(report, results, tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def html_text(written):
    return written["html"].read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ aggregate
def test_aggregate_matches_hand_computation(report, results):
    cks = results["checkpoints"]
    sft, ppo, base = cks["sft"]["sampled"], cks["ppo"]["sampled"], cks["base"]["sampled"]
    r = report["checkpoints"]
    assert r["sft"]["reward_mean"] == pytest.approx(sum(sft["reward"]) / N)
    assert r["ppo"]["gold_score"] == pytest.approx(sum(ppo["gold"]) / N)
    assert r["ppo"]["kl_to_sft"] == pytest.approx(sum(ppo["kl_to_sft"]) / N)
    assert r["sft"]["kl_to_sft"] == 0.0
    assert r["base"]["eos_rate"] == pytest.approx(sum(base["eos"]) / N)
    assert r["ppo"]["response_length_mean"] == pytest.approx(sum(ppo["length"]) / N)
    assert r["base"]["distinct_2"] == pytest.approx(2 / (2 * N))
    assert r["ppo"]["num_prompts"] == N and r["ppo"]["iteration"] == 30 and r["ppo"]["kind"] == "ppo"

    pw = report["pairwise"]["ppo_vs_sft"]
    assert pw["win_rate_reward"] == pytest.approx(_hand_win_rate(ppo["reward"], sft["reward"]))
    assert pw["win_rate_gold"] == pytest.approx(_hand_win_rate(ppo["gold"], sft["gold"]))
    for key in ("win_rate_reward", "win_rate_gold"):
        lo, hi = pw[f"{key}_ci95"]
        assert lo <= pw[key] <= hi
    assert pw["num_prompts"] == N
    sb = report["pairwise"]["sft_vs_base"]
    assert sb["win_rate_reward"] == pytest.approx(_hand_win_rate(sft["reward"], base["reward"]))


def test_reward_gold_agreement_by_hand(report, results):
    """On the prompts where the gold judge prefers one response, how often the reward model prefers the same one
    (a reward tie 0.5); prompts the judge ties are left out."""
    from pipeline.eval_report import reward_gold_agreement

    agree, n = reward_gold_agreement([3, 1, 2, 5, 0], [1, 2, 2, 4, 9], [1, 1, 0, 0.5, 1], [0, 0, 1, 0.5, None])
    assert n == 3 and agree.tolist() == [1.0, 0.0, 0.5]  # the 4th is a gold tie; the 5th has no gold for b
    cks = results["checkpoints"]
    ppo, sft = cks["ppo"]["sampled"], cks["sft"]["sampled"]
    pw = report["pairwise"]["ppo_vs_sft"]
    decided = [(rp, rs, gp, gs) for rp, rs, gp, gs in zip(ppo["reward"], sft["reward"], ppo["gold"], sft["gold"])
               if gp != gs]  # fmt: skip
    hand = [0.5 if rp == rs else float((rp > rs) == (gp > gs)) for rp, rs, gp, gs in decided]
    assert pw["gold_decided"] == len(decided) > 0
    assert pw["reward_gold_agreement"] == pytest.approx(sum(hand) / len(hand))
    lo, hi = pw["reward_gold_agreement_ci95"]
    assert lo <= pw["reward_gold_agreement"] <= hi
    no_interval = aggregate(results, n_boot=0)["pairwise"]["ppo_vs_sft"]
    assert no_interval["reward_gold_agreement"] == pw["reward_gold_agreement"]
    assert no_interval["reward_gold_agreement_ci95"] is None


def test_greedy_curves_examples(report, results):
    g = report["checkpoints_greedy"]
    assert set(g) == {"base", "sft", "ppo-iter-000020", "ppo"}  # ppo-iter-000010 has greedy None
    assert "kl_to_sft" not in g["ppo"]
    assert g["sft"]["reward_mean"] == pytest.approx(np.mean(results["checkpoints"]["sft"]["greedy"]["reward"]))

    curves = report["curves"]
    assert [c["name"] for c in curves] == ["sft", "ppo-iter-000010", "ppo-iter-000020", "ppo"]
    assert [c["iteration"] for c in curves] == [0, 10, 20, 30]
    assert curves[-1]["kl_to_sft"] == report["checkpoints"]["ppo"]["kl_to_sft"]

    ex = report["examples"]
    assert ex["ranked_by"] == "gold" and len(ex["best"]) == 3 and len(ex["worst"]) == 3
    assert ex["best"][0]["index"] == EVIL_PROMPT and ex["best"][0]["ppo"] == EVIL
    assert set(ex["best"][0]) >= {"prompt", "sft", "ppo", "sft_gold", "ppo_gold", "sft_reward", "ppo_reward"}
    assert not {e["index"] for e in ex["best"]} & {e["index"] for e in ex["worst"]}
    deltas = [e["ppo_gold"] - e["sft_gold"] for e in ex["best"] + ex["worst"]]
    assert min(deltas[:3]) >= max(deltas[3:])


def test_aggregate_is_deterministic(results, report):
    assert aggregate(results, n_boot=500, seed=0) == report


# --------------------------------------------------------------------------------------------- files
def test_report_json_has_required_keys(written):
    data = json.loads(written["json"].read_text())
    for name in ("base", "sft", "ppo"):
        assert set(data["checkpoints"][name]) >= {
            "reward_mean",
            "gold_score",
            "kl_to_sft",
            "response_length_mean",
            "eos_rate",
            "distinct_2",
            "num_prompts",
        }
    assert set(data["pairwise"]["ppo_vs_sft"]) >= {"win_rate_reward", "win_rate_gold", "win_rate_gold_ci95"}
    assert set(data) >= {"checkpoints", "checkpoints_greedy", "pairwise", "curves", "examples", "config"}
    assert data["config"]["task"] == "embedded"


def test_html_structure_and_escaping(html_text):
    for h in ("Summary", "PPO vs SFT", "Reward and gold vs KL", "Score distributions", "Examples"):
        assert re.search(rf"<h2>{re.escape(h)}</h2>", html_text), h
    assert len(re.findall(r'<img class="plot" [^>]*src="data:image/png;base64,', html_text)) == 3
    assert "<script" not in html_text.lower()  # the planted <script> response is escaped
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html_text
    assert "&lt;i&gt;please&lt;/i&gt;" in html_text and "<i>please" not in html_text  # prompts escaped too
    assert "<details>" in html_text and "max_new_tokens" in html_text  # config, collapsed


def test_html_has_no_external_urls(html_text):
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html_text)  # base64 could spell anything
    assert not re.search(r"(?i)(https?:|ftp:|//[a-z0-9])", text), re.findall(r"(?i).{30}(?:https?:|//).{30}", text)
    attr = r"(?i)\b(?:src|href|srcset|action)\s*=\s*"
    assert not re.search(attr + r"[\"'](?!data:image/png;base64,)", html_text)  # quoted: only inline PNGs
    assert not re.search(attr + r"(?![\"'])", html_text)  # no unquoted values at all
    assert "url(" not in text.lower() and "@import" not in text.lower()


def test_markdown_report(written):
    md = written["md"].read_text()
    for h in ("## Summary", "## PPO vs SFT", "## Reward and gold vs KL", "## Examples", "### Greedy decoding"):
        assert h in md
    assert "| base |" in md and "| sft |" in md and "| ppo |" in md
    assert "&lt;script&gt;" in md and "<script" not in md
    assert "\\| pipe<br>second line" in md  # cell-safe pipes and newlines
    row = next(line for line in md.splitlines() if line.startswith("| PPO vs SFT |"))
    assert row.count("[") == 3  # the three CIs


def test_summary_table(report):
    text = summary_table(report)
    lines = text.splitlines()
    assert lines[0].split()[0] == "checkpoint"
    assert [ln.split()[0] for ln in lines[2:5]] == ["base", "sft", "ppo"]
    assert "ppo-iter" not in text
    assert f"{report['pairwise']['ppo_vs_sft']['win_rate_reward']:.3f}" in text
    assert len({len(ln) for ln in lines[:5]}) == 1  # fixed width


# ------------------------------------------------------------------------------------ other shapes
def test_no_gold_path(tmp_path):
    res = make_results(has_gold=False)
    rep = aggregate(res, n_boot=200, seed=0)
    assert all(c["gold_score"] is None for c in rep["checkpoints"].values())
    assert all(c["gold_score"] is None for c in rep["checkpoints_greedy"].values())
    pw = rep["pairwise"]["ppo_vs_sft"]
    assert pw["win_rate_gold"] is None and pw["win_rate_gold_ci95"] is None
    assert pw["reward_gold_agreement"] is None and pw["gold_decided"] is None
    assert pw["win_rate_reward"] is not None
    assert rep["examples"]["ranked_by"] == "reward"
    assert rep["examples"]["best"][0]["index"] == EVIL_PROMPT and rep["examples"]["best"][0]["ppo_gold"] is None
    paths = write_reports(rep, res, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["checkpoints"]["ppo"]["gold_score"] is None
    html_text = paths["html"].read_text()
    assert "No gold judge" in html_text and "<script" not in html_text.lower()
    assert "gold judge" in summary_table(rep)


def test_without_ppo(tmp_path):
    res = make_results(with_ppo=False)
    rep = aggregate(res, n_boot=100, seed=0)
    assert "ppo_vs_sft" not in rep["pairwise"] and "sft_vs_base" in rep["pairwise"]
    assert [c["name"] for c in rep["curves"]] == ["sft"]
    assert rep["examples"]["best"] == []
    paths = write_reports(rep, res, tmp_path)
    assert "No PPO checkpoint" in paths["html"].read_text()
    assert "no PPO checkpoint" in summary_table(rep)


def test_missing_scores_are_skipped():
    res = make_results()
    res = copy.deepcopy(res)
    res["checkpoints"]["ppo"]["sampled"]["gold"][0] = None  # e.g. a failed judge call
    rep = aggregate(res, n_boot=100, seed=0)
    gold = [g for g in res["checkpoints"]["ppo"]["sampled"]["gold"] if g is not None]
    assert rep["checkpoints"]["ppo"]["gold_score"] == pytest.approx(np.mean(gold))
    assert rep["pairwise"]["ppo_vs_sft"]["gold_num_prompts"] == N - 1


# ------------------------------------------------------------------------------------------ chromium
@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(written, tmp_path):
    png = tmp_path / "shot.png"
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_report_html.py"), str(written["html"]), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert png.stat().st_size > 10_000


def curve(name, kind, kl, reward, gold=0.5, iteration=None):
    return {"name": name, "kind": kind, "iteration": iteration, "kl_to_sft": kl, "reward_mean": reward,
            "gold_score": gold, "gold_rephrased": None}  # fmt: skip


CURVES = [
    curve("sft", "sft", 0.0, 0.10, iteration=0),
    curve("ppo-iter-000004", "ppo_checkpoint", 3.0, 0.40, iteration=4),
    curve("ppo-iter-000008", "ppo_checkpoint", 5.0, 0.60, iteration=8),
    curve("ppo", "ppo", 7.0, 0.90, gold=0.9, iteration=12),
]


@pytest.mark.parametrize(
    "budget, want",
    [(4.0, "ppo-iter-000004"), (5.0, "ppo-iter-000008"), (100.0, "ppo"), (1.0, "sft"), (None, None)],
)
def test_recommend_highest_reward_within_the_kl_budget(budget, want):
    from pipeline.eval_report import recommend

    pick = recommend(CURVES, budget)
    assert pick["name"] == want and pick["kl_budget"] == budget
    if want:
        assert pick["reward_mean"] == next(c["reward_mean"] for c in CURVES if c["name"] == want)


def test_recommend_ignores_gold():
    from pipeline.eval_report import recommend

    gold_favours_sft = [{**c, "gold_score": 1.0 if c["kind"] == "sft" else 0.0} for c in CURVES]
    assert recommend(gold_favours_sft, 4.0)["name"] == recommend(CURVES, 4.0)["name"] == "ppo-iter-000004"
    worse_than_sft = [{**c, "reward_mean": -1.0} if c["kind"] != "sft" else c for c in CURVES]
    assert recommend(worse_than_sft, 100.0)["name"] == "sft"  # no PPO checkpoint beats SFT on the reward model


def test_report_names_the_recommendation(results):
    report = aggregate(results, kl_budget=1e9)
    rec = report["recommended"]
    best = max(report["curves"], key=lambda c: c["reward_mean"])
    assert rec["name"] == best["name"]
    assert f"Recommended checkpoint: {best['name']}" in summary_table(report)
    assert aggregate(results)["recommended"]["name"] is None  # no budget, no recommendation
