"""Tests of the reward stage (``pipeline/stage_reward.py``) on tiny models: the SFT -> reward chain and
the input-stage errors."""

from __future__ import annotations

import json

from pipeline import artifacts as art
from tests.conftest import error_line, run_rm, run_sft


def test_sft_then_rm_chain(setup):
    s = setup
    assert run_sft(s) == 0
    sft = s["artifacts"] / "sft"
    assert (sft / "adapter" / "adapter_model.safetensors").exists()
    assert (sft / "model" / "model.safetensors").exists()
    assert not list(sft.rglob("*.bin")) and not list(sft.rglob("*.pt")), "safetensors only"
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["status"] == "complete"
    assert manifest["tokenizer"]["pad_token"] != manifest["tokenizer"]["eos_token"]
    assert manifest["metrics"]["train_steps"] == 3
    assert not (s["artifacts"] / ".sft.staging").exists()

    assert run_rm(s) == 0
    rm = s["artifacts"] / "reward"
    m = json.loads((rm / "manifest.json").read_text())
    assert m["inputs"]["start_model"]["sha256"] == art.artifact_hash(sft)
    assert 0.0 <= m["metrics"]["test"]["accuracy"] <= 1.0 and m["metrics"]["test"]["num_pairs"] == 16
    from transformers import AutoModelForSequenceClassification

    scorer = AutoModelForSequenceClassification.from_pretrained(rm / "model")
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id != scorer.config.eos_token_id


def test_rm_before_sft_says_what_to_run(setup, capsys):
    assert run_rm(setup) == 2
    err = error_line(capsys)
    assert "rlhf sft" in err and "missing" in err
    assert not (setup["artifacts"] / "reward").exists()


def test_incomplete_input_stage_is_refused(setup, capsys):
    (setup["artifacts"] / "sft" / "model").mkdir(parents=True)  # a crashed stage without manifest
    assert run_rm(setup) == 2
    assert "incomplete" in error_line(capsys)
