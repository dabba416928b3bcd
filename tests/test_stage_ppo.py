"""Whole runs of the PPO stage (``pipeline/stage_ppo.py``) through its command line, on tiny models built in
the test: checked settings and one-line errors, learning on a rule reward, resume equivalence, a 2-process
run, a reward model with another tokenizer, and the non-finite stop."""

from __future__ import annotations

import json
import math
import os
import string
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    PPO_BASE,
    error_lines,
    fake_stage,
    flags,
    launch_two_processes,
    make_causal_lm,
    make_seq_cls,
    make_tokenizer,
    make_trainer,
    ppo_arguments,
    read_metrics,
    replace_reward,
    run_ppo,
)

# Every test starts from a fresh Accelerate state: on a GPU machine the stage sets it up for CUDA, and the
# CPU-only checks after it (make_trainer, Accelerator(cpu=True)) would otherwise find it taken.
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
BASE = PPO_BASE


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(dtype="bfloat16"), "--dtype bfloat16 needs autocast in the same precision: add --mixed_precision bf16"),
        (
            dict(dtype="bfloat16", mixed_precision="fp16"),
            "--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision bf16",
        ),
        (dict(dtype="bf16"), "--dtype 'bf16': use one of float32, bfloat16, float16"),
    ],
)
def test_precision_settings_are_checked(tiny_artifacts, prompts_file, capsys, settings, message):
    from pipeline.errors import PipelineError
    from pipeline.stage_ppo import main

    # Through main(), as a YAML recipe would set them (argparse `choices` never sees YAML values).
    stage, model_args, args = ppo_arguments(tiny_artifacts, prompts_file)
    for k, v in settings.items():
        setattr(model_args if hasattr(model_args, k) else args, k, v)
    with pytest.raises(PipelineError) as e:
        main(stage, model_args, args)
    assert str(e.value) == message
    assert not (tiny_artifacts / "ppo").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(save_every=0), "--save_every 0: use a whole number >= 1"),
        (dict(num_ppo_epochs=0), "--num_ppo_epochs 0: use a whole number >= 1"),
        (dict(num_iterations=2.5), "--num_iterations 2.5: use a whole number >= 1"),  # a YAML float
        (dict(temperature=0.0), "--temperature 0.0: use a value > 0"),
        (dict(gamma=1.5), "--gamma 1.5: use a value in [0, 1]"),
        (dict(lam=-0.1), "--lam -0.1: use a value in [0, 1]"),
        (dict(kl_estimator="k2"), "--kl_estimator 'k2': use k1 or k3"),
        (dict(target_kl=0.0), "--target_kl 0.0: use a value > 0, or leave it unset for a fixed beta"),
        (
            dict(update_chunk_tokens=-1),
            "--sample_every, --max_nonfinite_steps and --update_chunk_tokens: use a value >= 0",
        ),  # fmt: skip
        (dict(rollout_logprobs="exact"), "--rollout_logprobs 'exact': use auto, sampler, forward"),
        (
            dict(rollout_logprobs="sampler", top_k=20),
            "--rollout_logprobs sampler records log-probs under the top-k/top-p-filtered distribution, not the "
            "policy's: use --rollout_logprobs forward, or drop --top_k/--top_p",
        ),
    ],
)
def test_out_of_range_settings_are_one_line_errors_before_anything_is_touched(
    tiny_artifacts, prompts_file, settings, message
):
    from pipeline.errors import PipelineError
    from pipeline.stage_ppo import main

    (tiny_artifacts / "ppo-run" / "checkpoints").mkdir(parents=True)  # a run in progress must survive
    stage, model_args, args = ppo_arguments(tiny_artifacts, prompts_file)
    for k, v in settings.items():  # as a YAML recipe sets them: argparse never sees the value
        setattr(args, k, v)
    with pytest.raises(PipelineError) as e:
        main(stage, model_args, args)
    assert str(e.value) == message
    assert (tiny_artifacts / "ppo-run" / "checkpoints").is_dir() and not (tiny_artifacts / "ppo").exists()


def test_precision_error_is_one_line(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, dtype="float16") == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --dtype float16 needs autocast in the same precision: add --mixed_precision fp16"
    ]


LETTERS = set(string.ascii_lowercase)


def letter_share(prompts, responses):
    """Rule reward: share of lowercase ASCII letters in the decoded response."""
    return torch.tensor([sum(c in LETTERS for c in r) / max(1, len(r)) for r in responses])


# The learning test's run (benchmarks/rule_reward_seeds.py repeats it over seeds, estimators and precisions).
RULE_REWARD_SETTINGS = dict(
    num_iterations=30,
    rollout_batch_size=8,
    num_mini_batches=1,
    per_device_train_batch_size=8,
    local_rollout_forward_batch_size=8,
    response_length=8,
    learning_rate=3e-2,
    lr_scheduler_type="constant",
    temperature=1.0,
    num_ppo_epochs=2,
    lora_r=8,
    lora_alpha=16,
    kl_coef=0.01,
    missing_eos_penalty=0.0,
    seed=3,
    # Pinned, as the run was written: at this learning rate one run's path turns on rounding, and the sampler's
    # log-probs differ from a forward's by rounding. Over 24 seeds no difference between the two sources is shown
    # (paired -0.05 [-0.13, +0.02], docs/results.md), and the sampler's run matches the forward's to rounding
    # (test_sampler_log_probs_learn_what_a_policy_forward_learns); no learning test runs the sampler's.
    rollout_logprobs="forward",
)


RULE_REWARD_ESTIMATORS = {
    "gae": {},
    "rloo": {"advantage_estimator": "rloo", "num_samples_per_prompt": 4, "rollout_batch_size": 2},
    "grpo": {"advantage_estimator": "grpo", "num_samples_per_prompt": 4, "rollout_batch_size": 2},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
}


def rule_reward_scores(art: Path, tok, prompts: Path, **kw) -> list[float]:
    """The learning run (``RULE_REWARD_SETTINGS`` with ``kw`` on top) on fresh tiny stages in ``art``: each
    iteration's mean score. The caller has replaced the reward with ``letter_share``."""
    # A larger init than the default 0.02 gives the tiny model logits big enough that a LoRA can move them.
    fake_stage(art, "sft", make_causal_lm, tok, initializer_range=0.3)
    fake_stage(art, "reward", make_seq_cls, tok)
    assert run_ppo(art, prompts, **{**RULE_REWARD_SETTINGS, **kw}) == 0
    return [row["objective/scores"] for row in read_metrics(art / "ppo" / "metrics.jsonl")]


def first_and_last_five(scores: list[float]) -> tuple[float, float]:
    return sum(scores[:5]) / 5, sum(scores[-5:]) / 5


@pytest.mark.parametrize("estimator", list(RULE_REWARD_ESTIMATORS.values()), ids=list(RULE_REWARD_ESTIMATORS))
def test_learns_rule_reward(tmp_path, tiny_tok, prompts_file, monkeypatch, estimator):
    replace_reward(monkeypatch, letter_share)
    scores = rule_reward_scores(tmp_path / "artifacts", tiny_tok, prompts_file, **estimator)
    assert len(scores) == 30
    first5, last5 = first_and_last_five(scores)
    assert last5 > first5 + 0.25, f"mean reward did not rise: {[round(s, 2) for s in scores]}"


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("nan_first_iteration", [False, True], ids=["clean", "skipped-step-before-checkpoint"])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_tok, prompts_file, monkeypatch, nan_first_iteration):
    from safetensors.torch import load_file

    settings = dict(num_iterations=4, save_every=2, learning_rate=1e-2)
    if nan_first_iteration:
        # NaN scores for the batch holding the first prompt of iteration 1 (the stage's epoch-0 shuffle), so
        # steps are skipped before the checkpoint and the skip counter must survive the resume.
        first = torch.randperm(32, generator=torch.Generator().manual_seed(BASE["seed"])).tolist()[0]
        marker = f"take {first}."

        def wrap(real):
            def reward_fn(prompts, responses):
                scores = real(prompts, responses)
                return scores * float("nan") if any(p[-1]["content"].endswith(marker) for p in prompts) else scores

            return reward_fn

        replace_reward(monkeypatch, wrap=wrap)
    arts = {}
    for name in ("full", "resumed"):
        arts[name] = tmp_path / name
        fake_stage(arts[name], "sft", make_causal_lm, tiny_tok)
        fake_stage(arts[name], "reward", make_seq_cls, tiny_tok)

    assert run_ppo(arts["full"], prompts_file, **settings) == 0

    art = arts["resumed"]
    assert run_ppo(art, prompts_file, **settings, stop_after_iterations=2) == 0
    assert not (art / "ppo").exists()
    assert (art / "ppo-run" / "checkpoints" / "iter-000002" / "checkpoint.json").exists()
    assert len(read_metrics(art / "ppo-run" / "metrics.jsonl")) == 2
    assert run_ppo(art, prompts_file, **settings, resume_from_checkpoint="latest") == 0
    assert (art / "ppo" / "manifest.json").exists() and not (art / "ppo-run").exists()

    full = read_metrics(arts["full"] / "ppo" / "metrics.jsonl")
    resumed = read_metrics(art / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4] == [r["iteration"] for r in full]
    for a, b in zip(full, resumed):
        keys = {k for k, v in a.items() if isinstance(v, (int, float)) and not k.startswith("time/")}
        assert keys == {k for k, v in b.items() if isinstance(v, (int, float)) and not k.startswith("time/")}
        for k in sorted(keys):
            assert _same(a[k], b[k]), (a["iteration"], k, a[k], b[k])
    skipped = [r["train/nonfinite_skipped"] for r in full]
    assert skipped == ([2, 2, 2, 2] if nan_first_iteration else [0, 0, 0, 0])  # 2 minibatch steps per iteration

    wa = load_file(str(arts["full"] / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(torch.count_nonzero(v) for k, v in wa.items() if "lora_B" in k)


def test_plain_rerun_continues_an_interrupted_run(tmp_path, tiny_tok, prompts_file):
    """Re-running the same command after an interruption continues from the newest checkpoint (nothing is
    deleted) and ends with the weights of an uninterrupted run; other settings are refused unless --force."""
    from safetensors.torch import load_file

    settings = dict(num_iterations=3, save_every=1, learning_rate=1e-2)
    arts = {}
    for name in ("full", "rerun"):
        arts[name] = tmp_path / name
        fake_stage(arts[name], "sft", make_causal_lm, tiny_tok)
        fake_stage(arts[name], "reward", make_seq_cls, tiny_tok)
    assert run_ppo(arts["full"], prompts_file, **settings) == 0

    art = arts["rerun"]
    assert run_ppo(art, prompts_file, **settings, stop_after_iterations=2) == 0
    # Another config finds the interrupted run: refused, and its checkpoints are kept.
    assert run_ppo(art, prompts_file, **{**settings, "learning_rate": 5e-3}) == 2
    assert [p.name for p in sorted((art / "ppo-run" / "checkpoints").iterdir())] == ["iter-000001", "iter-000002"]
    assert run_ppo(art, prompts_file, **settings) == 0  # the same command: continues at iteration 3
    assert not (art / "ppo-run").exists()
    assert [r["iteration"] for r in read_metrics(art / "ppo" / "metrics.jsonl")] == [1, 2, 3]
    full = load_file(str(arts["full"] / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    rerun = load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    assert full.keys() == rerun.keys() and all(torch.equal(full[k], rerun[k]) for k in full)
    # The published checkpoints are whole (the run directory's copy was linked, then removed).
    for it in (1, 2, 3):
        assert (art / "ppo" / "checkpoints" / f"iter-{it:06d}" / "checkpoint.json").exists()


def test_force_discards_an_interrupted_run_with_other_settings(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, num_iterations=3, save_every=1, stop_after_iterations=1) == 0
    assert run_ppo(tiny_artifacts, prompts_file, num_iterations=2, save_every=1) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "interrupted PPO run with other inputs or config" in err[0] and "--force" in err[0]
    assert run_ppo(tiny_artifacts, prompts_file, num_iterations=2, save_every=1, force="true") == 0
    assert [r["iteration"] for r in read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl")] == [1, 2]


def ppo_in_two_processes(art, prompts_file, **settings):
    """The PPO stage under ``accelerate launch`` with 2 gloo processes, on ``PPO_BASE`` plus ``settings``."""
    return launch_two_processes(
        "pipeline/stage_ppo.py",
        "--artifact_dir",
        str(art),
        "--dataset_name",
        str(prompts_file),
        *flags({**PPO_BASE, **settings}),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision",
    [{}, {"dtype": "bfloat16", "mixed_precision": "bf16"}, {"num_mini_batches": 1, "per_device_train_batch_size": 4}],
    ids=["fp32", "bf16", "fused-forward"],  # the last: the update reuses the rollout's forward (can_fuse)
)
def test_two_process_run(tiny_artifacts, prompts_file, precision):
    n_iter, rbs = 2, 4
    proc = ppo_in_two_processes(
        tiny_artifacts, prompts_file, num_iterations=n_iter, rollout_batch_size=rbs, save_every=1, **precision
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tiny_artifacts / "ppo"
    assert (out / "manifest.json").exists()
    for it in range(1, n_iter + 1):
        ck = out / "checkpoints" / f"iter-{it:06d}"
        assert json.loads((ck / "state.json").read_text())["world_size"] == 2
        assert (ck / "rng-0.safetensors").exists() and (ck / "rng-1.safetensors").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["episode"] for r in rows] == [2 * rbs * i for i in range(1, n_iter + 1)]
    assert json.loads((out / "manifest.json").read_text())["config"]["sizes"]["world_size"] == 2


OTHER_CORPUS = [
    "Reward models score answers; a higher score means a better answer.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "ZEBRAS, QUOKKAS & YAKS: an inventory of 42 unusual animals.",
]


def test_reward_model_with_other_tokenizer(tiny_artifacts, tiny_tok, prompts_file, tmp_path):
    rtok = make_tokenizer(tmp_path / "rtok", vocab_size=280, seed_text=OTHER_CORPUS)
    assert rtok.get_vocab() != tiny_tok.get_vocab()
    rm_path = tmp_path / "other_rm"
    make_seq_cls(rm_path, rtok, seed=5)
    assert run_ppo(tiny_artifacts, prompts_file, reward_model_path=str(rm_path)) == 0
    manifest = json.loads((tiny_artifacts / "ppo" / "manifest.json").read_text())
    models = manifest["metrics"]["models"]
    assert models["same_tokenizer"] is False
    assert models["reward_paths"] == [str(rm_path)]
    assert models["value_path"] == models["policy_path"] == str(tiny_artifacts / "sft" / "model")
    rows = read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl")
    assert rows and all(math.isfinite(r["objective/scores"]) and math.isfinite(r["loss/value_avg"]) for r in rows)
    assert len({r["objective/scores"] for r in rows}) > 1 or rows[0]["objective/scores_std"] > 0


@pytest.mark.parametrize("missing, command", [("sft", "rlhf sft"), ("reward", "rlhf reward")])
def test_missing_input_stage_is_a_clean_error(tmp_path, tiny_tok, prompts_file, capsys, missing, command):
    art = tmp_path / "artifacts"
    present = {"sft": ("reward", make_seq_cls), "reward": ("sft", make_causal_lm)}[missing]
    fake_stage(art, present[0], present[1], tiny_tok)
    assert run_ppo(art, prompts_file) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1, errs
    assert str(art / missing) in errs[0] and command in errs[0] and "first" in errs[0]
    assert not (art / "ppo").exists() and not (art / "ppo-run").exists()


def test_causal_lm_as_reward_model_is_refused(tiny_artifacts, prompts_file, capsys):
    """A causal LM would get a random score head: refused with one line, before anything is loaded."""
    assert run_ppo(tiny_artifacts, prompts_file, reward_model_path=str(tiny_artifacts / "sft" / "model")) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "is a LlamaForCausalLM, not a reward model" in errs[0], errs
    assert not (tiny_artifacts / "ppo").exists() and not (tiny_artifacts / "ppo-run").exists()


def test_reward_model_with_two_outputs_is_refused(tiny_artifacts, tiny_tok, prompts_file, tmp_path, capsys):
    make_seq_cls(tmp_path / "two", tiny_tok, num_labels=2)
    assert run_ppo(tiny_artifacts, prompts_file, reward_model_path=str(tmp_path / "two")) == 2
    assert "has 2 outputs; a reward model has one score (num_labels=1)" in error_lines(capsys.readouterr().err)[0]


def test_non_divisible_batch_is_a_clean_error(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, rollout_batch_size=6, num_mini_batches=4) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "is not divisible" in errs[0], errs
    assert not (tiny_artifacts / "ppo").exists()


def test_nonfinite_loss_stops_run_without_artifact(tiny_artifacts, prompts_file, monkeypatch, capsys):
    replace_reward(monkeypatch, lambda prompts, responses: torch.full((len(responses),), float("nan")))
    max_bad = 2
    rc = run_ppo(
        tiny_artifacts,
        prompts_file,
        num_iterations=6,
        num_mini_batches=1,
        per_device_train_batch_size=4,
        max_nonfinite_steps=max_bad,
    )
    assert rc == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "non-finite" in errs[0], errs
    assert f"{max_bad + 1} optimizer steps in a row" in errs[0]
    assert not (tiny_artifacts / "ppo").exists()
    # One optimizer step per iteration: iterations 1..max_bad were skipped and logged, the next one stopped the run.
    rows = read_metrics(tiny_artifacts / "ppo-run" / "metrics.jsonl")
    assert [r["train/nonfinite_skipped"] for r in rows] == list(range(1, max_bad + 1))


# ----------------------------------------------------------------------------- 10. value adapter placement


@pytest.mark.parametrize("flag, layers", [(1, [1]), (None, [1]), (-1, [0, 1])], ids=["top-1", "default", "all"])
def test_value_adapter_placement(tiny_artifacts, prompts_file, flag, layers):
    """``--value_lora_layers N``: the value adapter has LoRA weights in the top N layers only (plus the score
    head), so the value backward stops there. Unset, it is the top quarter (one of the tiny model's two layers)
    and the manifest records the number; -1 is every layer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from pipeline.modeling import linear_leaf_names

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_artifacts / "reward" / "model", num_labels=1)

    kwargs = {} if flag is None else {"value_lora_layers": flag}
    assert run_ppo(tiny_artifacts, prompts_file, **kwargs) == 0
    keys = load_file(str(tiny_artifacts / "ppo" / "value" / "adapter_model.safetensors")).keys()
    lora = [k for k in keys if "lora_" in k]
    assert sorted({int(k.split(".layers.")[1].split(".")[0]) for k in lora}) == layers
    assert len(lora) == 2 * len(linear_leaf_names(rm)) * len(layers)  # A and B of every linear layer
    assert any("score" in k for k in keys)
    manifest = json.loads((tiny_artifacts / "ppo" / "manifest.json").read_text())
    assert manifest["config"]["ppo"]["value_lora_layers"] == (1 if flag is None else flag)


@pytest.mark.parametrize("flag", [0, -2])
def test_value_lora_layers_out_of_range_is_a_clean_error(tiny_artifacts, prompts_file, flag, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, value_lora_layers=flag) == 2
    assert "--value_lora_layers" in capsys.readouterr().err
    assert not (tiny_artifacts / "ppo").exists()


def test_value_lora_layers_with_full_finetune_is_a_clean_error(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, value_lora_layers=1, value_full_finetune=True) == 2
    assert "--value_lora_layers" in capsys.readouterr().err
    assert not (tiny_artifacts / "ppo").exists()


def test_sharded_training_is_refused_with_one_line(tiny_artifacts, prompts_file, monkeypatch, capsys):
    import pipeline.ppo.generation as generation

    monkeypatch.setattr(generation, "sharded_weights", lambda accelerator: "DeepSpeed ZeRO-3")
    assert run_ppo(tiny_artifacts, prompts_file) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "PPO does not support DeepSpeed ZeRO-3 yet" in errs[0] and "ZeRO-2" in errs[0]
    assert not (tiny_artifacts / "ppo-run").exists()


def test_tokenizer_larger_than_the_embedding_is_one_line(tmp_path, tiny_tok, prompts_file, capsys):
    art = tmp_path / "artifacts"
    fake_stage(art, "sft", make_causal_lm, tiny_tok, vocab_size=len(tiny_tok) - 10)
    fake_stage(art, "reward", make_seq_cls, tiny_tok)
    assert run_ppo(art, prompts_file) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and f"its tokenizer has {len(tiny_tok)} tokens" in errs[0], errs


def test_resuming_a_finished_run_is_one_line(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, save_every=1) == 0
    final = tiny_artifacts / "ppo" / "checkpoints" / "iter-000002"
    assert run_ppo(tiny_artifacts, prompts_file, save_every=1, resume_from_checkpoint=str(final)) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "ends a finished run (iteration 2 of 2)" in errs[0], errs
    assert (tiny_artifacts / "ppo" / "manifest.json").exists()


@pytest.mark.parametrize("resume", [{}, {"resume_from_checkpoint": "latest"}], ids=["plain", "explicit"])
def test_rerun_after_a_kill_between_last_checkpoint_and_publish_publishes(tiny_artifacts, prompts_file, monkeypatch,
                                                                          resume):  # fmt: skip
    """A kill after the final checkpoint but before ``ppo/`` is in place: a plain rerun, or one resuming from
    that checkpoint, publishes from it."""
    from safetensors.torch import load_file

    from pipeline.ppo.trainer import PPOTrainer

    with monkeypatch.context() as m:
        m.setattr(PPOTrainer, "publish", lambda self: None)  # the process dies here
        assert run_ppo(tiny_artifacts, prompts_file, save_every=1) == 0
    run = tiny_artifacts / "ppo-run"
    assert not (tiny_artifacts / "ppo").exists()
    final = load_file(str(run / "checkpoints" / "iter-000002" / "policy_adapter" / "adapter_model.safetensors"))
    before = read_metrics(run / "metrics.jsonl")
    calls = []
    monkeypatch.setattr(PPOTrainer, "update", lambda self, ro: calls.append(1))
    assert run_ppo(tiny_artifacts, prompts_file, save_every=1, **resume) == 0
    assert not calls, "no iteration runs again"
    assert (tiny_artifacts / "ppo" / "manifest.json").exists() and not run.exists()
    assert read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl") == before
    published = load_file(str(tiny_artifacts / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    assert published.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(published[k], final[k], rtol=0, atol=0)


def test_max_prompt_length_counts_tokens(tiny_artifacts, tmp_path, capsys):
    """Prompts longer than --max_prompt_length tokens (as the rollout encodes them) are dropped, with a count."""
    from accelerate import Accelerator

    from pipeline.modeling import load_tokenizer
    from pipeline.stage_ppo import prompt_length, setup
    from tests.conftest import prompt_rows, write_jsonl

    rows = prompt_rows(16) + [{"prompt": [{"role": "user", "content": "volcanoes " * 60}]} for _ in range(3)]
    lengths = [prompt_length(load_tokenizer(str(tiny_artifacts / "sft" / "model")), r["prompt"]) for r in rows]
    limit = max(lengths[:16])
    assert limit < min(lengths[16:])
    prompts = write_jsonl(tmp_path / "mixed.jsonl", rows)
    stage, model_args, args = ppo_arguments(tiny_artifacts, prompts, max_prompt_length=limit)
    trainer = setup(stage, model_args, args, Accelerator(cpu=True))
    assert trainer.prompts == [r["prompt"] for r in rows[:16]]
    assert f"dropped 3 prompts longer than {limit} tokens" in capsys.readouterr().out


def test_prompt_plus_response_longer_than_the_context_is_one_line(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, response_length=600) == 2  # the tiny model's context is 512
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "exceeds the policy's context of 512 tokens" in errs[0], errs


def test_rloo_run_publishes_a_policy_and_no_value_model(tiny_artifacts, prompts_file):
    assert run_ppo(tiny_artifacts, prompts_file, advantage_estimator="rloo", num_samples_per_prompt=2) == 0
    out = tiny_artifacts / "ppo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["models"]["value_path"] is None and not (out / "value").exists()
    rows = read_metrics(out / "metrics.jsonl")
    # episodes count responses: 4 prompts x 2 samples per iteration
    assert [r["episode"] for r in rows] == [8, 16] and all("loss/value_avg" not in r for r in rows)
    assert all("time/value_forward_s" not in r for r in rows)  # no value forward runs


@pytest.mark.parametrize("rollout_logprobs", ["forward", "sampler"])
def test_metrics_split_each_iteration_into_timed_phases(tiny_artifacts, prompts_file, rollout_logprobs):
    assert run_ppo(tiny_artifacts, prompts_file, rollout_logprobs=rollout_logprobs) == 0
    phases = ("generate", "value_forward", "reference_forward", "reward")
    for row in read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl"):
        seconds = [row[f"time/{p}_s"] for p in phases]
        assert all(s > 0 for s in seconds) and sum(seconds) <= row["time/rollout_s"]
        assert 0 < row["time/update_s"] <= row["time/iteration_s"] - row["time/rollout_s"]
        # the sampler's log-probs need no policy forward
        assert (row.get("time/policy_forward_s", 0) > 0) == (rollout_logprobs == "forward")


@pytest.mark.parametrize(
    "settings, want",
    [
        (dict(), "sampler"),  # PPO_BASE: fp32, two minibatches
        (dict(top_p=0.9), "forward"),
        (dict(top_k=20), "forward"),
        (dict(repetition_penalty=1.2), "forward"),  # in the policy's generation config
        (dict(num_mini_batches=1, per_device_train_batch_size=4), "forward"),  # the update reuses the forward
        (dict(dtype="bfloat16", mixed_precision="bf16"), "forward"),
        (dict(dtype="bfloat16", mixed_precision="bf16", rollout_logprobs="sampler"), "sampler"),
        (dict(rollout_logprobs="forward"), "forward"),
    ],
)
def test_rollout_logprobs_auto_takes_the_sampler_s_only_where_they_agree_to_rounding(
    tiny_artifacts, prompts_file, settings, want
):
    """--rollout_logprobs auto (the default): the sampler's log-probs in fp32 when it draws from the policy's own
    temperature-scaled distribution and the update does not reuse the rollout's forward; else a policy forward.
    The manifest's config records the choice (the trainer's args are what it writes)."""
    settings = dict(settings)
    penalty = settings.pop("repetition_penalty", None)
    if penalty is not None:
        write_generation_config(tiny_artifacts, repetition_penalty=penalty)
    trainer, _, _ = make_trainer(tiny_artifacts, prompts_file, **settings)
    assert trainer.args.rollout_logprobs == want and trainer.config["ppo"]["rollout_logprobs"] == want
    assert trainer.sampler_logprobs == (want == "sampler")


def write_generation_config(art: Path, **settings) -> None:
    from transformers import GenerationConfig

    model = art / "sft" / "model"
    config = GenerationConfig.from_pretrained(model) if (model / "generation_config.json").exists() else None
    config = config or GenerationConfig()
    config.update(**settings)
    config.save_pretrained(model)


def test_sampler_log_probs_under_a_repetition_penalty_are_refused(tiny_artifacts, prompts_file, capsys):
    write_generation_config(tiny_artifacts, repetition_penalty=1.2)
    assert run_ppo(tiny_artifacts, prompts_file, rollout_logprobs="sampler") == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --rollout_logprobs sampler: the policy's generation config sets repetition_penalty=1.2, so the "
        "sampler draws from another distribution than the policy's; use --rollout_logprobs forward"
    ]
    assert not (tiny_artifacts / "ppo").exists() and not (tiny_artifacts / "ppo-run").exists()


def test_sampler_log_probs_learn_what_a_policy_forward_learns(tmp_path, tiny_tok, prompts_file):
    """--rollout_logprobs sampler takes the rollout's policy log-probs and entropy from the sampler instead of a
    policy forward: in fp32 the run matches one with the forward, metric for metric and weight for weight, and the
    sampler's token-probability error, measured then on the update's first minibatch, stays at 1."""
    from safetensors.torch import load_file

    sizes = dict(num_iterations=3, learning_rate=1e-2, num_mini_batches=2)
    runs = {}
    for mode in ("sampler", "forward"):
        art = tmp_path / mode
        fake_stage(art, "sft", make_causal_lm, tiny_tok)
        fake_stage(art, "reward", make_seq_cls, tiny_tok)
        assert run_ppo(art, prompts_file, rollout_logprobs=mode, **sizes) == 0
        rows = read_metrics(art / "ppo" / "metrics.jsonl")
        assert ("time/policy_forward_s" in rows[0]) == (mode == "forward")
        assert all(1.0 <= r["val/sampler_token_prob_error"] < 1.0 + 1e-4 for r in rows)
        assert json.loads((art / "ppo" / "manifest.json").read_text())["config"]["ppo"]["rollout_logprobs"] == mode
        runs[mode] = (rows, load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors")))
    # The old log-probs differ by rounding, so the gradient norm the clip divides by does: a value can land on the
    # other side of its clip boundary (one token of the 24 an iteration's minibatches hold here).
    assert_same_run(runs["sampler"], runs["forward"], clip_ties=1 / 24 + 1e-6)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(advantage_estimator="rloo"), "set --num_samples_per_prompt 2 or more"),
        (dict(advantage_estimator="grpo", num_samples_per_prompt=2, value_lora_layers=1), "uses no value model"),
        (
            dict(num_samples_per_prompt=3, per_device_train_batch_size=4),
            "minibatch size / per_device_train_batch_size",
        ),
    ],
)
def test_estimator_settings_are_checked(tiny_artifacts, prompts_file, capsys, settings, message):
    assert run_ppo(tiny_artifacts, prompts_file, **settings) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and message in errs[0], errs


def letter_share_rule(prompt, response):
    """``--reward_funcs`` form of :func:`letter_share`: one (prompt messages, response text) pair -> float."""
    assert isinstance(prompt, list) and prompt[-1]["role"] == "user"
    return sum(c in LETTERS for c in response) / max(1, len(response))


def failing_rule(prompt, response):
    raise ValueError("cannot parse the answer")


def test_learns_a_rule_function_without_a_reward_model(tmp_path, tiny_tok, prompts_file):
    art = tmp_path / "artifacts"
    fake_stage(art, "sft", make_causal_lm, tiny_tok, initializer_range=0.3)  # no reward stage at all
    settings = dict(num_iterations=30, rollout_batch_size=2, num_samples_per_prompt=4, num_mini_batches=1,
                    per_device_train_batch_size=8, local_rollout_forward_batch_size=8, response_length=8,
                    learning_rate=3e-2, lr_scheduler_type="constant", temperature=1.0, num_ppo_epochs=2, lora_r=8,
                    lora_alpha=16, kl_coef=0.01, missing_eos_penalty=0.0, seed=3, advantage_estimator="rloo",
                    reward_model_path="none", reward_funcs=f"{__name__}:letter_share_rule",
                    reward_weights=2.0)  # fmt: skip
    assert run_ppo(art, prompts_file, **settings) == 0
    rows = read_metrics(art / "ppo" / "metrics.jsonl")
    rule, scores = [r["objective/rule_0"] for r in rows], [r["objective/scores"] for r in rows]
    assert all(math.isclose(s, 2.0 * r, rel_tol=1e-5) for s, r in zip(scores, rule))  # weight 2, nothing else
    assert sum(rule[-5:]) / 5 > sum(rule[:5]) / 5 + 0.12, f"rule reward did not rise: {[round(x, 2) for x in rule]}"
    manifest = json.loads((art / "ppo" / "manifest.json").read_text())
    assert manifest["metrics"]["models"]["reward_paths"] == [] and "reward" not in manifest["inputs"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(reward_funcs=f"{__name__}:failing_rule"), f"reward function {__name__}:failing_rule raised ValueError"),
        (dict(reward_funcs="tests.no_such_module:f"), "--reward_funcs tests.no_such_module:f: cannot import"),
        (dict(reward_funcs=f"{__name__}:letter_share_rule", reward_weights=[1.0, 2.0]), "2 --reward_weights for 1"),
        (dict(reward_model_path="none"), "--reward_model_path none trains on --reward_funcs alone"),
        (dict(reward_aggregation="max"), "--reward_aggregation"),
    ],
)
def test_reward_settings_and_failing_functions_are_one_line(tiny_artifacts, prompts_file, capsys, settings, message):
    assert run_ppo(tiny_artifacts, prompts_file, **settings) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and message in errs[0], errs
    assert not (tiny_artifacts / "ppo").exists()


def failing_on_rank_1_rule(prompt, response):
    if os.environ.get("RANK") == "1":
        raise ValueError("cannot parse the answer")
    return 0.0


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_process(tiny_artifacts, prompts_file):
    """A refusal raised on rank 1 alone: rank 1 prints its one line, rank 0 learns of it in the same step and
    exits 2 in silence (rather than crash in its next collective), and nothing is published. The launcher
    adds its own summary of the failed processes."""
    t = time.perf_counter()
    proc = ppo_in_two_processes(tiny_artifacts, prompts_file, num_iterations=2, rollout_batch_size=4, save_every=1,
                                reward_funcs=f"{__name__}:failing_on_rank_1_rule")  # fmt: skip
    assert proc.returncode != 0
    errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # the launcher adds its summary
    assert len(errs) == 1, proc.stderr[-3000:]
    assert errs[0].startswith(f"error: reward function {__name__}:failing_on_rank_1_rule raised"), errs
    assert "[rank0]" not in proc.stderr and "RuntimeError" not in proc.stderr  # rank 0 did not crash in gloo
    assert proc.stderr.count("exitcode  : 2") >= 1, proc.stderr[-3000:]  # the launcher's summary: exit 2
    assert time.perf_counter() - t < 120
    assert not (tiny_artifacts / "ppo").exists()


def make_reward_adapter(path, base_path, seed):
    """A LoRA reward adapter (score head included) on ``base_path``, as ``rlhf reward`` writes ``reward/adapter``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_(0, 1.0)
    model.save_pretrained(path)
    return path


def test_ensemble_of_reward_adapters_shares_one_base_and_aggregates(tiny_artifacts, prompts_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from reward_models.learned import load_reward_tokenizer, reward_scores

    base = str(tiny_artifacts / "sft" / "model")
    paths = [str(make_reward_adapter(tmp_path / f"rm{i}", base, seed=i)) for i in range(3)]
    trainer, reward, prompts = make_trainer(tiny_artifacts, prompts_file, reward_model_path=paths,
                                            reward_aggregation="mean_minus_std", reward_ensemble_coef=0.5)  # fmt: skip
    assert len({id(m.model) for m in reward.members}) == 1  # one base model in memory, three adapters
    responses = ["a short answer", "another one, longer than the first", "x"] * (len(prompts) // 3) + ["y"] * (
        len(prompts) % 3
    )
    got = reward(prompts, responses)
    tok = load_reward_tokenizer(paths[0], trainer.tokenizer)
    separate = []
    for path in paths:  # each member loaded on its own base
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), path)
        model.config.pad_token_id = tok.pad_token_id
        separate.append(reward_scores(model.eval(), tok, prompts, responses))
    separate = torch.stack(separate)
    assert separate.std(0).min() > 1e-3  # the members disagree, so the aggregation matters
    expected = separate.mean(0) - 0.5 * separate.std(0, unbiased=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert trainer.models["reward_paths"] == paths and trainer.models["value_path"] == base


@pytest.mark.parametrize("source", ["forward", "sampler"])
@pytest.mark.parametrize("merged", [True, False])
def test_sampler_log_probs_match_the_training_forward(tiny_artifacts, prompts_file, merged, source):
    """The rollout path (the merged copy through pipeline/decoding.py, or the PEFT policy through generate) draws
    from the distribution the training forward computes: in fp32 the multiplicative token-probability error stays
    at 1, iteration after iteration, as the adapter moves away from zero (a learning rate high enough to move it),
    measured by the rollout's policy forward or, with the sampler's log-probs, by the update's first minibatch."""
    assert run_ppo(tiny_artifacts, prompts_file, merged_generation=merged, learning_rate=1e-2, num_iterations=3,
                   rollout_logprobs=source) == 0  # fmt: skip
    rows = read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl")
    assert rows[-1]["objective/kl"] != 0.0  # the policy moved
    for row in rows:
        assert 1.0 <= row["val/sampler_token_prob_error"] < 1.0 + 1e-4


def test_fused_rollout_forward_learns_what_the_separate_forwards_learn(tmp_path, tiny_tok, prompts_file, monkeypatch):
    """With one epoch of one minibatch of one micro-batch the rollout's policy and value forward is the update's
    own (PPOTrainer.can_fuse): the run must match one that recomputes them, metric for metric and weight for weight."""
    from safetensors.torch import load_file

    from pipeline.ppo.trainer import PPOTrainer

    sizes = dict(num_mini_batches=1, per_device_train_batch_size=4, num_iterations=3, learning_rate=1e-2)
    runs = {}
    for fused in (True, False):
        art = tmp_path / f"fused-{fused}"
        fake_stage(art, "sft", make_causal_lm, tiny_tok)
        fake_stage(art, "reward", make_seq_cls, tiny_tok)
        monkeypatch.setattr(PPOTrainer, "can_fuse", lambda self, f=fused: f)
        assert run_ppo(art, prompts_file, rollout_logprobs="forward", **sizes) == 0
        rows = read_metrics(art / "ppo" / "metrics.jsonl")
        assert ("time/policy_value_forward_s" in rows[0]) == fused and ("time/policy_forward_s" in rows[0]) != fused
        runs[fused] = (rows, load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors")))
    assert_same_run(runs[True], runs[False])


def assert_same_run(got: tuple[list[dict], dict], want: tuple[list[dict], dict], clip_ties: float = 0.0) -> None:
    """Two runs' ``(metrics rows, published policy adapter)`` agree up to rounding (rows summed in another
    order), and the policy moved. ``clip_ties``: how far clip fractions may differ, where rounding can move a
    token across the clip boundary (they count tokens; the rest stays within rounding). The losses get 1e-5: the
    policy loss of a first minibatch is minus the mean whitened advantage, zero but for the float32 rounding of
    a sum of unit-sized terms taken in another order (1.1e-6 apart on an Intel host with AMX)."""
    (rows, weights), (want_rows, want_weights) = got, want
    assert want_rows[-1]["objective/kl"] != 0.0
    for a, b in zip(rows, want_rows, strict=True):
        for k, v in b.items():
            if isinstance(v, float) and not k.startswith("time/") and math.isfinite(v):
                slack = clip_ties if "clipfrac" in k else 1e-5 if k.startswith("loss/") else 1e-6
                assert a[k] == pytest.approx(v, rel=1e-4, abs=slack), k
    assert weights.keys() == want_weights.keys()
    for k in want_weights:
        torch.testing.assert_close(weights[k], want_weights[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_bf16_forwards_trained_through_take_the_math_attention_kernel(
    tiny_artifacts, prompts_file, monkeypatch, fresh_accelerate_state, fused
):
    """Under bf16 on a CPU every forward trained through runs the math kernel's arithmetic
    (pipeline.modeling.training_attention, the faster backward there), as PPO's grouped attention
    (pipeline.grouped_attention, no repeated key/value heads): the update's forwards; and when the update
    reuses the rollout's forward (fused), all the rollout's scoring forwards (policy with gradients, reference,
    value), so that the log-probs compared come from one kernel. With separate forwards the rollout's scoring
    forwards, which run without gradients, keep SDPA's flash kernel (the faster there). Generation keeps flash.
    Before the first update the policy is the reference: KL 0. On a GPU (the stage's device where there is one)
    every forward keeps flash."""
    import torch.nn.functional as F

    from pipeline import grouped_attention
    from pipeline.ppo.trainer import PPOTrainer

    real, calls, where = F.scaled_dot_product_attention, [], {"phase": "generation"}
    real_grouped = grouped_attention.grouped_attention

    def spy(*args, **kwargs):
        calls.append((where["phase"], "flash" if torch.backends.cuda.flash_sdp_enabled() else "math"))
        return real(*args, **kwargs)

    def grouped_spy(*args, **kwargs):
        calls.append((where["phase"], "grouped"))
        return real_grouped(*args, **kwargs)

    def inside(method, phase):
        def wrapped(self, *args, **kwargs):
            where["phase"] = phase
            try:
                return method(self, *args, **kwargs)
            finally:
                where["phase"] = "generation"

        return wrapped

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(grouped_attention, "grouped_attention", grouped_spy)
    monkeypatch.setattr(PPOTrainer, "_forward", inside(PPOTrainer._forward, "rollout"))
    monkeypatch.setattr(PPOTrainer, "update", inside(PPOTrainer.update, "update"))
    sizes = dict(num_mini_batches=1, per_device_train_batch_size=4) if fused else {}
    assert run_ppo(tiny_artifacts, prompts_file, dtype="bfloat16", mixed_precision="bf16", num_iterations=2,
                   **sizes) == 0  # fmt: skip
    cpu = not torch.cuda.is_available()  # the stage trains on a GPU where there is one: no change there
    kinds = {phase: [k for p, k in calls if p == phase] for phase in ("generation", "rollout", "update")}
    trained_through = "grouped" if cpu else "flash"
    assert kinds["generation"] and set(kinds["generation"]) == {"flash"}
    assert kinds["rollout"] and set(kinds["rollout"]) == {trained_through if fused else "flash"}
    if fused:
        assert not kinds["update"]  # the update reuses the rollout's forward
    else:
        assert kinds["update"] and set(kinds["update"]) == {trained_through}
    rows = read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl")
    assert ("time/policy_value_forward_s" in rows[0]) == fused
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0


@pytest.mark.parametrize("native", [True, False], ids=["bf16-native", "bf16-emulated"])
def test_auto_precision_follows_the_hardware_and_is_recorded(
    tiny_artifacts, prompts_file, monkeypatch, native, fresh_accelerate_state
):
    """The default --dtype auto --mixed_precision auto: bf16 bases with bf16 autocast where bf16 is native, fp32
    elsewhere; the manifest records the choice, so the same command on other hardware is another run."""
    import pipeline.modeling

    monkeypatch.setattr(pipeline.modeling, "fast_bf16", lambda has_cuda: native)
    assert run_ppo(tiny_artifacts, prompts_file, dtype="auto", mixed_precision="auto") == 0
    config = json.loads((tiny_artifacts / "ppo" / "manifest.json").read_text())["config"]
    want = ("bfloat16", "bf16") if native else ("float32", "no")
    assert (config["model"]["dtype"], config["ppo"]["mixed_precision"]) == want


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    import pipeline.modeling as modeling

    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not modeling.fast_bf16(has_cuda=False)
    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert modeling.fast_bf16(has_cuda=False)


def test_chunked_update_forward_matches_one_forward(tiny_artifacts, prompts_file):
    """On one CPU process the update's forward runs its rows as length-sorted chunks cut to their own longest
    prompt and response (PPOTrainer._train_forward): the response log-probs, entropies and values at every real
    position, and the gradients of a loss over them, are those of one forward over the padded batch."""
    from pipeline.ppo.trainer import CHUNK_MIN_SAVING

    trainer, _, _ = make_trainer(tiny_artifacts, prompts_file)
    assert trainer.chunk_tokens  # one CPU process: chunked by default
    g = torch.Generator().manual_seed(0)
    B, P, R = 8, 12, 9  # no response reaches R: one forward cut to the rows drops 2 columns
    prompt_lens = torch.tensor([12, 3, 7, 12, 5, 9, 2, 11])
    response_lens = torch.tensor([7, 1, 4, 0, 7, 2, 5, 3])
    vocab = trainer.tokenizer.vocab_size
    ids = torch.randint(5, vocab, (B, P + R), generator=g)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        am[i, P - prompt_lens[i] : P + response_lens[i]] = 1
    ids = ids.masked_fill(am == 0, trainer.tokenizer.pad_token_id)
    mask = am[:, P:].bool()

    def run(chunk_tokens):
        trainer.chunk_tokens = chunk_tokens
        trainer.model.zero_grad()
        lp, ent, values = trainer._train_forward(ids, am, P)
        v = values[:, P - 1 : -1]
        loss = (torch.where(mask, lp, 0.0).sum() + torch.where(mask, v, 0.0).pow(2).sum()) / mask.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        entropies.append(ent[mask])
        return lp.detach(), v.detach(), loss.detach(), grads

    entropies = []
    calls = []
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **k: calls.append(a[0].numel()) or forward(*a, **k)
    lp1, v1, loss1, g1 = run(None)
    assert calls == [B * (P + R)]
    calls.clear()
    lp2, v2, loss2, g2 = run(40)
    assert len(calls) >= 3 and sum(calls) < B * (P + 7) * (1 - CHUNK_MIN_SAVING)
    calls.clear()
    lp3, v3, loss3, g3 = run(10**6)  # one chunk: one forward, cut to the longest prompt and response
    assert calls == [B * (P + 7)]
    assert g1.keys() == g2.keys() == g3.keys() and g1
    for lp, v, loss, g in ((lp2, v2, loss2, g2), (lp3, v3, loss3, g3)):
        torch.testing.assert_close(lp[mask], lp1[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[mask], v1[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)
    for ent in entropies[1:]:
        torch.testing.assert_close(ent, entropies[0], rtol=1e-5, atol=1e-5)


def test_chunked_update_learns_what_one_forward_learns(tmp_path, tiny_tok, prompts_file, monkeypatch):
    """Whole runs, separate and fused forwards: chunked update forwards give the metrics and weights of one
    forward per micro-batch, up to rounding."""
    from safetensors.torch import load_file

    from pipeline.ppo.trainer import PolicyAndValue, PPOTrainer

    counts = {"update": 0, "forward": 0}

    def counting(name, real):
        def wrapped(*a, **k):
            counts[name] += 1
            return real(*a, **k)

        return wrapped

    import pipeline.ppo.trainer

    monkeypatch.setattr(pipeline.ppo.trainer, "CHUNK_MIN_SAVING", -1.0)  # chunk wherever there are two chunks
    monkeypatch.setattr(PPOTrainer, "_train_forward", counting("update", PPOTrainer._train_forward))
    monkeypatch.setattr(PolicyAndValue, "forward", counting("forward", PolicyAndValue.forward))
    for sizes in (dict(num_mini_batches=2), dict(num_mini_batches=1, per_device_train_batch_size=4)):
        runs = {}
        for chunk in (None, 16):
            counts.update(update=0, forward=0)
            art = tmp_path / f"mb{sizes['num_mini_batches']}-chunk-{chunk}"
            fake_stage(art, "sft", make_causal_lm, tiny_tok)
            fake_stage(art, "reward", make_seq_cls, tiny_tok)
            monkeypatch.setattr(PPOTrainer, "update_chunk_tokens", lambda self, c=chunk: c)
            assert run_ppo(art, prompts_file, **sizes, num_iterations=3, learning_rate=1e-2) == 0
            assert counts["update"] == 3 * sizes["num_mini_batches"]
            if chunk:  # the update's forwards ran as chunks
                assert counts["forward"] >= 2 * counts["update"]
            else:
                assert counts["forward"] == counts["update"]
            runs[chunk] = (read_metrics(art / "ppo" / "metrics.jsonl"),
                           load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors")))  # fmt: skip
        assert_same_run(runs[16], runs[None])


def test_update_value_forward_starts_from_the_rollouts_frozen_layers(tiny_artifacts, prompts_file):
    """The value adapter sits on the top layer of the tiny model's two (the default depth), so the rollout keeps
    the value model's hidden states entering that layer (``Rollout.value_hidden``, from its prefix-sharing
    scoring forward): they equal one plain forward's, zeros where masked; the update's value forward starts from
    them without running the bottom layer, and its values and value gradients equal those of running every
    layer."""
    from pipeline.sequences import position_ids_from

    trainer, _, prompts = make_trainer(tiny_artifacts, prompts_file)
    assert trainer.value_from_layer == 1
    ro = trainer.rollout(prompts)
    qr, am, P = ro.query_response, ro.attention_mask, ro.context_length
    net = trainer.unwrapped
    inner = net.value_backbone()
    backbone = getattr(inner, inner.base_model_prefix)
    with torch.no_grad():
        want = backbone(input_ids=qr, attention_mask=am, position_ids=position_ids_from(am), use_cache=False,
                        output_hidden_states=True).hidden_states[1]  # fmt: skip
    real = am.bool()
    assert ro.value_hidden.shape == want.shape and not ro.value_hidden[~real].any()
    torch.testing.assert_close(ro.value_hidden[real], want[real], rtol=1e-5, atol=1e-5)

    bottom = []
    backbone.layers[0].register_forward_hook(lambda *_: bottom.append(1))
    mask = am[:, P:].bool()

    def run(hidden):
        trainer.model.zero_grad()
        bottom.clear()
        _, _, values = trainer._train_forward(qr, am, P, hidden)
        v = values[:, P - 1 : -1]
        torch.where(mask, v, 0.0).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.value.named_parameters() if p.grad is not None}
        return v[mask].detach(), grads, len(bottom)

    v1, g1, ran1 = run(ro.value_hidden)
    v0, g0, ran0 = run(None)
    assert ran1 == 0 and ran0 > 0
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert {p.requires_grad for layer in backbone.layers[:1] for p in layer.parameters()} == {False}


@pytest.mark.parametrize(
    "settings, start",
    [
        ({}, 1),  # the value adapter on the top layer (the default): the bottom one is computed once
        (dict(value_lora_layers=-1), 0),  # every layer trained
        (dict(value_full_finetune=True), 0),
        (dict(num_mini_batches=1, per_device_train_batch_size=4), 0),  # fused: the rollout's forward is the update's
        (dict(advantage_estimator="rloo", num_samples_per_prompt=2), 0),  # no value model
    ],
    ids=["top-layer", "every-layer", "full-finetune", "fused", "critic-free"],
)
def test_where_the_update_reuses_the_rollouts_frozen_value_layers(tiny_artifacts, prompts_file, settings, start):
    trainer, _, _ = make_trainer(tiny_artifacts, prompts_file, **settings)
    assert trainer.value_from_layer == trainer.unwrapped.value_from_layer == start


def test_frozen_value_layers_are_not_reused_across_kinds_of_attention_layers(tiny_artifacts, prompts_file):
    """A model whose layers differ in kind (``config.layer_types``: sliding and full attention) picks each layer's
    mask by its index, which a cut layer list would shift: every layer runs in the update."""
    trainer, _, _ = make_trainer(tiny_artifacts, prompts_file)
    assert trainer.frozen_value_layers() == 1
    config = trainer.unwrapped.value_backbone().config
    config.layer_types = ["sliding_attention", "full_attention"]
    assert trainer.frozen_value_layers() == 0


def test_value_forward_from_the_frozen_layers_learns_what_every_layer_learns(tmp_path, tiny_tok, prompts_file,
                                                                             monkeypatch):  # fmt: skip
    """Whole runs: the update's value forward started from the rollout's frozen-layer output gives the metrics
    and weights of running every layer, up to rounding."""
    from safetensors.torch import load_file

    from pipeline.ppo.trainer import PPOTrainer

    if torch.cuda.is_available():
        pytest.skip("the stage trains on the GPU where there is one, and reuses the layers on one CPU process only")
    real, starts, runs = PPOTrainer.frozen_value_layers, [], {}
    for reuse in (True, False):
        art = tmp_path / f"reuse-{reuse}"
        fake_stage(art, "sft", make_causal_lm, tiny_tok)
        fake_stage(art, "reward", make_seq_cls, tiny_tok)
        monkeypatch.setattr(
            PPOTrainer, "frozen_value_layers", lambda self, r=reuse: starts.append(real(self) * r) or starts[-1]
        )
        assert run_ppo(art, prompts_file, num_iterations=3, learning_rate=1e-2) == 0
        value = load_file(str(art / "ppo" / "value" / "adapter_model.safetensors"))
        runs[reuse] = (read_metrics(art / "ppo" / "metrics.jsonl"),
                       {**load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors")),
                        **{f"value.{k}": v for k, v in value.items()}})  # fmt: skip
    assert starts == [1, 0]  # the first run reused the bottom layer, the second ran every layer
    assert_same_run(runs[True], runs[False])
