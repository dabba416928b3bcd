"""benchmarks/quality.py: the statistics of the multi-seed table, checked by hand (the runs themselves are the
benchmark, not a test)."""

import importlib.util
import math

import pytest

from pipeline.artifacts import REPO_ROOT

spec = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_t_interval_by_hand():
    m, lo, hi = quality.t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sample std / sqrt(n)
    assert m == 2.0 and lo == pytest.approx(2.0 - half) and hi == pytest.approx(2.0 + half)
    assert quality.t_interval([0.5]) == (0.5, None, None)
    assert quality.t_interval([]) == (None, None, None)


def test_compare_against_the_same_seeds_sft():
    sft = {"gold": [0.0, 0.5, 1.0, 0.5], "reward": [0.0, 0.0, 0.0, 0.0], "kl": [0.0] * 4, "gold_rephrased": [0.0] * 4}
    policy = {"gold": [1.0, 0.5, 0.5, 1.0], "reward": [1.0, -1.0, 1.0, 0.0], "kl": [2.0, 4.0, 0.0, 2.0],
              "gold_rephrased": [0.5, 0.5, 0.0, 0.0]}  # fmt: skip
    got = quality.compare(policy, sft)
    assert got["gold"] == 0.75 and got["gold_gain"] == 0.25
    assert got["gold_win_rate"] == (1 + 0.5 + 0 + 1) / 4  # ties count one half
    assert got["rm_win_rate"] == (1 + 0 + 1 + 0.5) / 4
    assert got["rm_gold_agreement"] == (1 + 0 + 0.5) / 3  # prompts 0, 2, 3: gold prefers one side; 3 a reward tie
    assert got["kl"] == 2.0 and got["gold_rephrased"] == 0.25 and got["gold_rephrased_gain"] == 0.25


def test_markdown_table_has_one_row_per_run():
    ci = (0.5, 0.4, 0.6)
    row = {k: ci for k in quality.KEYS}
    result = {"seeds": [1, 2], "kl_budget": 4.0, "sft": {"gold": ci, "gold_rephrased": ci},
              "summary": {"ppo_demo (final)": {**row, "rl_train_s": (400.0, 380.0, 420.0), "seeds": [1, 2]},
                          "SFT, compute-matched": {**row, "seeds": [1]}}}  # fmt: skip
    lines = quality.markdown(result).splitlines()
    assert lines[2].startswith("| SFT (demo), 2 seeds | 0.500 [0.400, 0.600]")
    assert lines[3].startswith("| ppo_demo (final), 2 seeds |") and lines[3].endswith("| 400 [380, 420] |")
    assert lines[4].startswith("| SFT, compute-matched, 1 seeds |") and lines[4].endswith("| n/a |")


def test_scarce_setting_trains_sft_on_its_split_for_epochs_and_the_rest_on_theirs():
    from argparse import Namespace

    assert quality.setting_flags(Namespace(setting="a", scarce_sft_epochs=5)) == ([], [])
    sft, rest = quality.setting_flags(Namespace(setting="b", scarce_sft_epochs=5))
    assert sft == ["--dataset_train_split", "train_scarce", "--max_steps", "-1", "--num_train_epochs", "5"]
    assert rest == ["--dataset_train_split", "train_scarce"]
    from pipeline.artifacts import embedded_data

    for kind in ("sft", "preference", "prompt"):
        assert embedded_data(kind, "train_scarce").is_file()
