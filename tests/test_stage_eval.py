"""The evaluation stage end to end on tiny models built in the test: a short PPO run, then
``rlhf eval`` on the embedded held-out prompts (gold judge included), in fp32 and bf16."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import prompt_rows, run_ppo, write_jsonl


@pytest.fixture
def ppo_artifacts(tiny_artifacts, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))
    assert run_ppo(tiny_artifacts, prompts, num_iterations=2, save_every=1) == 0
    return tiny_artifacts


def test_merged_policy_equals_sft_plus_adapter(tiny_artifacts, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.stage_eval import load_merged_policy

    sft = str(tiny_artifacts / "sft" / "model")
    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(sft),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )  # random B: the adapter changes the outputs
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        want = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), tmp_path / "adapter")
            .eval()(input_ids=ids)
            .logits
        )
        plain = AutoModelForCausalLM.from_pretrained(sft).eval()(input_ids=ids).logits
        got = load_merged_policy(sft, tmp_path / "adapter", torch.float32)(input_ids=ids).logits
        half = load_merged_policy(sft, tmp_path / "adapter", torch.bfloat16)
        got_half = half(input_ids=ids).logits.float()
    assert (want - plain).abs().max() > 1e-2  # the check below is not vacuous
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert (got_half - want).abs().max() < 0.1 * (want - plain).abs().max()


@pytest.mark.parametrize("bf16", ["false", "true"])
def test_eval_stage_end_to_end(ppo_artifacts, bf16, capsys):
    from pipeline.stage_eval import cli

    argv = [
        "--artifact_dir",
        str(ppo_artifacts),
        "--max_eval_samples",
        "6",
        "--batch_size",
        "4",
        "--response_length",
        "6",
        "--checkpoints",
        "sft",
        "ppo",
        "--greedy",
        "false",
        "--bf16",
        bf16,
        "--kl_budget",
        "1000",
        "--publish_recommended",
        "true",
    ]
    assert cli(argv) == 0
    report = json.loads((ppo_artifacts / "eval" / "report.json").read_text())
    cks = report["checkpoints"]
    assert set(cks) == {"sft", "ppo-iter-000001", "ppo"}  # the intermediate checkpoint is evaluated too
    results = json.loads((ppo_artifacts / "eval" / "results.json").read_text())
    for name, c in cks.items():  # the report's means are those of the per-prompt results
        sampled = results["checkpoints"][name]["sampled"]
        assert c["num_prompts"] == 6 == len(sampled["responses"])
        assert c["gold_score"] == pytest.approx(sum(sampled["gold"]) / 6)
        assert c["eos_rate"] == pytest.approx(sum(sampled["eos"]) / 6)
        assert c["response_length_mean"] == pytest.approx(sum(sampled["length"]) / 6)
    pair = report["pairwise"]["ppo_vs_sft"]
    ppo, sft = (results["checkpoints"][n]["sampled"]["gold"] for n in ("ppo", "sft"))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ppo, sft)]
    assert pair["win_rate_gold"] == pytest.approx(sum(wins) / 6)
    for name, c in cks.items():  # the held-out phrasing: the same prompts in other words, scored by the gold judge
        rephrased = results["checkpoints"][name]["rephrased"]
        assert len(rephrased["responses"]) == 6 and c["gold_rephrased"] == pytest.approx(sum(rephrased["gold"]) / 6)
    # The recommendation, recomputed from the per-prompt results: with a budget no checkpoint exceeds, the
    # highest mean reward-model score wins, whatever the gold judge says.
    means = {n: sum(results["checkpoints"][n]["sampled"]["reward"]) / 6 for n in cks}
    want = max(means, key=means.get)
    manifest_json = json.loads((ppo_artifacts / "eval" / "manifest.json").read_text())
    pick = manifest_json["metrics"]["recommended"]
    assert pick["name"] == want and pick["reward_mean"] == pytest.approx(means[want])
    published = ppo_artifacts / "eval" / "policy_adapter"
    assert published.is_dir() == (want != "sft") and pick.get("published") == (
        "policy_adapter" if want != "sft" else None
    )
    for f in ("report.md", "report.html", "results.json", "manifest.json"):
        assert (ppo_artifacts / "eval" / f).is_file()
    assert "Recommended checkpoint: " + want in (ppo_artifacts / "eval" / "report.md").read_text()
    manifest = (ppo_artifacts / "eval" / "manifest.json").read_text()
    capsys.readouterr()
    assert cli(argv) == 0  # complete for the same inputs and config: skipped, artifact unchanged
    out = capsys.readouterr().out
    assert "is complete for these inputs and config; skipping" in out and "report at" not in out
    assert (ppo_artifacts / "eval" / "manifest.json").read_text() == manifest


class _Killed(Exception):
    """Stands in for a kill in the middle of the evaluation."""


def test_rerun_after_a_kill_keeps_finished_checkpoints(ppo_artifacts, monkeypatch):
    """A kill while evaluating the final PPO policy: the rerun evaluates only that one and writes the same
    results as an uninterrupted evaluation."""
    import shutil

    import pipeline.stage_eval as stage_eval

    argv = ["--artifact_dir", str(ppo_artifacts), "--max_eval_samples", "4", "--batch_size", "4",
            "--response_length", "5", "--checkpoints", "sft", "ppo", "--greedy", "false"]  # fmt: skip
    assert stage_eval.cli(argv) == 0
    uninterrupted = json.loads((ppo_artifacts / "eval" / "results.json").read_text())
    shutil.rmtree(ppo_artifacts / "eval")

    real = stage_eval.evaluate_policy
    evaluated = []

    def dies_on_final_ppo(model, sft, tok, prompts, args, score, name, greedy):
        if name == "ppo":
            raise _Killed
        return real(model, sft, tok, prompts, args, score, name, greedy)

    monkeypatch.setattr(stage_eval, "evaluate_policy", dies_on_final_ppo)
    with pytest.raises(_Killed):
        stage_eval.cli(argv)
    assert sorted(p.name for p in (ppo_artifacts / "eval-run").glob("*.json")) == ["ppo-iter-000001.json", "sft.json"]

    def counting(model, sft, tok, prompts, args, score, name, greedy):
        evaluated.append(name)
        return real(model, sft, tok, prompts, args, score, name, greedy)

    monkeypatch.setattr(stage_eval, "evaluate_policy", counting)
    assert stage_eval.cli(argv) == 0
    assert evaluated == ["ppo"]
    assert json.loads((ppo_artifacts / "eval" / "results.json").read_text()) == uninterrupted
    assert not (ppo_artifacts / "eval-run").exists()


def test_ppo_trained_on_another_sft_model_is_refused(ppo_artifacts, capsys):
    from pipeline.stage_eval import cli
    from tests.conftest import error_lines

    manifest = ppo_artifacts / "sft" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"test"', '"a later SFT run"'))  # sft/ was redone since
    assert cli(["--artifact_dir", str(ppo_artifacts), "--max_eval_samples", "2", "--checkpoints", "sft", "ppo"]) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "was trained on another SFT model" in errs[0]
    assert not (ppo_artifacts / "eval").exists()


def test_a_typo_in_checkpoints_is_one_line(tiny_artifacts, capsys):
    from pipeline.stage_eval import cli
    from tests.conftest import error_lines

    assert cli(["--artifact_dir", str(tiny_artifacts), "--checkpoints", "sft", "pp0"]) == 2
    assert error_lines(capsys.readouterr().err) == ["error: --checkpoints sft pp0: name one or more of base, sft, ppo"]


@pytest.mark.parametrize("flag", ["--batch_size", "--generation_batch_size", "--response_length"])
def test_a_batch_size_or_length_below_one_is_one_line(tiny_artifacts, flag, capsys):
    from pipeline.stage_eval import cli
    from tests.conftest import error_lines

    assert cli(["--artifact_dir", str(tiny_artifacts), "--checkpoints", "sft", flag, "0"]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {flag} 0: use a whole number >= 1"]
    assert not (tiny_artifacts / "eval").exists()


def test_generation_batches_are_scored_in_scoring_batches(tmp_path):
    """``--generation_batch_size`` samples more prompts at once than ``--batch_size`` scores: the scoring pieces,
    cut from each generation batch without the left padding their rows share, give every response the log-prob
    the sampler recorded for it (fp32: the KL of a policy to itself is 0 up to rounding)."""
    from transformers import AutoModelForCausalLM

    from pipeline.stage_eval import EvalArguments, generate, sequence_logprobs
    from tests.conftest import make_causal_lm, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    make_causal_lm(tmp_path / "lm", tok, initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    prompts = [[{"role": "user", "content": "word " * n}] for n in (1, 9, 2, 5, 3)]  # prompt lengths differ
    args = EvalArguments(batch_size=2, generation_batch_size=5, response_length=7, temperature=0.7, seed=3)
    texts, lengths, eos, batches, own = generate(model, tok, prompts, args, True, "test")
    assert len(texts) == len(own) == 5 and [len(b[0]) for b in batches] == [2, 2, 1]
    assert all(b[1][:, 0].any() for b in batches)  # no column of left padding every row of a piece shares
    assert batches[2][0].shape[1] < batches[1][0].shape[1] < batches[0][0].shape[1]  # so shorter pieces
    torch.testing.assert_close(torch.tensor(sequence_logprobs(model, batches, 0.7)), torch.tensor(own),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
