"""The local evaluate metric modules: distinct_n and win_rate (no hub access)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.metrics import AVAILABLE, METRICS_DIR, distinct_n, load_metric, metric_path, win_rate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dn():
    return load_metric("distinct_n")


@pytest.fixture(scope="module")
def wr():
    return load_metric("win_rate")


# ------------------------------------------------------------------------------------------ distinct_n
def test_distinct_bigrams_hand_case(dn):
    r = dn.compute(predictions=["a b a b"], n=2)
    assert r["distinct_n"] == pytest.approx(2 / 3)  # ab, ba, ab
    assert (r["num_distinct"], r["num_ngrams"]) == (2, 3)


def test_distinct_lowercase_whitespace_and_per_text_ngrams(dn):
    # "A  B\na" -> a b a: bigrams ab, ba; second text "b a" -> ba.  No bigram across the two texts.
    r = dn.compute(predictions=["A  B\na", "b a"], n=2)
    assert (r["num_distinct"], r["num_ngrams"]) == (2, 3)
    assert dn.compute(predictions=["x y", "z w"], n=2)["distinct_n"] == 1.0  # would be 3/3 anyway; no "y z"
    assert dn.compute(predictions=["x y", "z w"], n=2)["num_ngrams"] == 2


def test_distinct_unigrams_and_trigrams(dn):
    assert dn.compute(predictions=["a a b"], n=1)["distinct_n"] == pytest.approx(2 / 3)
    assert dn.compute(predictions=["a b c a b c"], n=3)["distinct_n"] == pytest.approx(3 / 4)


def test_distinct_empty_input(dn):
    assert dn.compute(predictions=[], n=2)["distinct_n"] == 0.0
    r = dn.compute(predictions=["", "word"], n=2)  # no text long enough for a bigram
    assert r["distinct_n"] == 0.0 and r["num_ngrams"] == 0


def test_distinct_wrapper():
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)


# -------------------------------------------------------------------------------------------- win_rate
def test_win_rate_ties_count_half(wr):
    r = wr.compute(scores_a=[1.0, 0.5, 0.0, 2.0], scores_b=[0.0, 0.5, 1.0, 1.0], n_boot=200, seed=0)
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (r["wins"], r["ties"], r["losses"], r["num_prompts"]) == (2, 1, 1, 4)
    assert wr.compute(scores_a=[3, 3, 3], scores_b=[3, 3, 3], n_boot=50)["win_rate"] == 0.5


def test_win_rate_all_wins_and_all_losses(wr):
    r = wr.compute(scores_a=[2, 3, 4], scores_b=[1, 1, 1], n_boot=100, seed=0)
    assert r["win_rate"] == 1.0 and r["ci_low"] == 1.0 and r["ci_high"] == 1.0
    assert wr.compute(scores_a=[0, 0], scores_b=[1, 1], n_boot=100)["win_rate"] == 0.0


def _scores(n, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.normal(0.3, 1.0, n)
    b = rng.normal(0.0, 1.0, n)
    return a.tolist(), b.tolist()


def test_win_rate_ci_contains_point_estimate(wr):
    for n in (5, 20, 200):
        a, b = _scores(n, seed=n)
        r = wr.compute(scores_a=a, scores_b=b, n_boot=1000, seed=0)
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0


def test_win_rate_ci_shrinks_with_more_data(wr):
    widths = []
    for n in (20, 200, 2000):
        a, b = _scores(n, seed=1)
        r = wr.compute(scores_a=a, scores_b=b, n_boot=1000, seed=0)
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[2] < 0.07  # ~ 2 * 1.96 * 0.5 / sqrt(2000) = 0.044


def test_win_rate_deterministic_with_seed(wr):
    a, b = _scores(50, seed=3)
    r1 = wr.compute(scores_a=a, scores_b=b, n_boot=500, seed=7)
    r2 = wr.compute(scores_a=a, scores_b=b, n_boot=500, seed=7)
    r3 = wr.compute(scores_a=a, scores_b=b, n_boot=500, seed=8)
    assert r1 == r2
    assert r1["win_rate"] == r3["win_rate"]
    assert (r1["ci_low"], r1["ci_high"]) != (r3["ci_low"], r3["ci_high"])


def test_win_rate_edge_cases(wr):
    r = wr.compute(scores_a=[], scores_b=[], n_boot=100)
    assert r["win_rate"] is None and r["ci_low"] is None and r["num_prompts"] == 0
    r = wr.compute(scores_a=[1, 0], scores_b=[0, 1], n_boot=0)
    assert r["win_rate"] == 0.5 and r["ci_low"] is None
    assert wr.compute(scores_a=[1.0, 0.5], scores_b=[0.95, 0.5], tie_tol=0.1, n_boot=0)["win_rate"] == 0.5
    with pytest.raises(ValueError):
        wr.compute(scores_a=[float("nan")], scores_b=[0.0], n_boot=0)


def test_win_rate_wrapper():
    r = win_rate([1, 2, 3], [0, 2, 4], n_boot=100, seed=0)
    assert r["win_rate"] == pytest.approx(0.5)
    assert r["ci_low"] <= 0.5 <= r["ci_high"]


# ------------------------------------------------------------------------------------------- loading
def test_unknown_metric_never_falls_through_to_hub():
    with pytest.raises(ValueError):
        load_metric("accuracy")
    for name in AVAILABLE:  # every listed metric is a local module
        assert (metric_path(name) / f"{name}.py").is_file()


def test_load_offline_with_network_blocked(monkeypatch):
    """Loading both modules by local path opens no socket (fast, in-process version of the test below)."""
    import socket

    import evaluate

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before evaluate is imported

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in ("distinct_n", "win_rate"):
        m = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
        assert isinstance(m, evaluate.Metric)
    assert load_metric("distinct_n").compute(predictions=["a b a b"])["distinct_n"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_load_offline_from_local_paths(tmp_path):
    """Both modules load and compute in a fresh process (fresh HF cache), hub disabled, no usable network."""
    code = (
        "import json, evaluate\n"
        "from pipeline.metrics import METRICS_DIR\n"
        "d = evaluate.load(str(METRICS_DIR / 'distinct_n'), keep_in_memory=True)\n"
        "w = evaluate.load(str(METRICS_DIR / 'win_rate'), keep_in_memory=True)\n"
        "print(json.dumps([d.compute(predictions=['a b a b'])['distinct_n'],"
        " w.compute(scores_a=[1, 0], scores_b=[0, 0], n_boot=10)['win_rate']]))\n"
    )
    dead = "http://127.0.0.1:9"  # a closed port: any network attempt fails at once
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    d, w = json.loads(p.stdout.strip().splitlines()[-1])
    assert d == pytest.approx(2 / 3) and w == 0.75
