"""Tests of the SFT stage (``pipeline/stage_sft.py``) on a tiny model built in the test; the tests
parametrised over both TRL stages cover the reward stage too."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.stage_sft import cli as sft_cli
from tests.conftest import FAST, error_line, make_causal_lm, run_rm, run_sft, sft_rows, write_jsonl


def test_sft_merged_model_equals_base_plus_adapter(setup):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = setup
    assert run_sft(s) == 0
    sft = s["artifacts"] / "sft"
    merged = AutoModelForCausalLM.from_pretrained(sft / "model").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s["base"]), sft / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(s["base"]).eval()
    x = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        a, b, c = merged(x).logits, with_adapter(x).logits, base(x).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4), "training changed nothing"


def test_complete_stage_is_skipped_and_force_reruns(setup, capsys):
    s = setup
    assert run_sft(s) == 0
    first = (s["artifacts"] / "sft" / "manifest.json").read_text()
    assert run_sft(s) == 0
    assert "skipping" in capsys.readouterr().out
    assert (s["artifacts"] / "sft" / "manifest.json").read_text() == first
    assert run_sft(s, "--force") == 0
    assert (s["artifacts"] / "sft" / "manifest.json").read_text() != first


def test_bad_data_leaves_previous_artifact_untouched(setup, tmp_path, capsys):
    s = setup
    assert run_sft(s) == 0
    before = (s["artifacts"] / "sft" / "manifest.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    rc = sft_cli(
        [
            "--model_name_or_path",
            str(s["base"]),
            "--dataset_name",
            str(bad),
            "--artifact_dir",
            str(s["artifacts"]),
            *FAST,
            "--force",
        ]
    )
    assert rc == 2
    err = error_line(capsys)
    assert str(bad) in err and "row 0" in err
    assert (s["artifacts"] / "sft" / "manifest.json").read_text() == before


def test_nan_loss_writes_nothing(setup, tiny_tok, tmp_path, capsys):
    import torch

    s = setup
    model = make_causal_lm(tmp_path / "nan_base", tiny_tok)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_base")
    rc = sft_cli(
        [
            "--model_name_or_path",
            str(tmp_path / "nan_base"),
            "--dataset_name",
            str(s["sft"]),
            "--artifact_dir",
            str(s["artifacts"]),
            *FAST,
        ]
    )
    assert rc == 2 and "nothing was written" in error_line(capsys)
    assert not (s["artifacts"] / "sft").exists() and not (s["artifacts"] / ".sft.staging").exists()


def test_unknown_flag_is_an_error(setup, capsys):
    assert run_sft(setup, "--not_a_flag", "1") == 2
    assert "--not_a_flag" in error_line(capsys)


def test_completion_loss_matches_trl_loss_and_gradients(setup, tiny_tok, fresh_accelerate_state):
    """The SFT stage's completion-position loss equals TRL's fused-head loss, value and gradients."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from pipeline.data import load_for
    from pipeline.modeling import ensure_distinct_pad_token
    from pipeline.stage_sft import completion_trainer_class

    rows = sft_rows(6) + [
        {
            "prompt": [{"role": "user", "content": "Hi."}],  # prompts of different lengths
            "completion": [{"role": "assistant", "content": "hello there, how are you today?"}],
        }
    ]
    data = write_jsonl(setup["base"].parent / "mixed.jsonl", rows)
    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    ensure_distinct_pad_token(tiny_tok, model)
    args = SFTConfig(
        output_dir=str(setup["base"].parent / "out"),
        per_device_train_batch_size=7,
        report_to="none",
        use_cpu=True,
        completion_only_loss=True,
        max_length=128,
    )
    trainer = completion_trainer_class()(
        model=model,
        args=args,
        processing_class=tiny_tok,
        train_dataset=load_for("sft", str(data), "train", None, None),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_cols = (batch["labels"] == -100).all(dim=0).long().argmin().item()
    assert prompt_cols > 1  # the check below only means something if prompt positions are skipped

    def loss_and_grads(fn):
        trainer.model.zero_grad()
        loss = fn(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]

    ours, g_ours = loss_and_grads(lambda m, b: trainer.compute_loss(m, b))
    trl, g_trl = loss_and_grads(lambda m, b: super(type(trainer), trainer).compute_loss(m, b))
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)
    assert len(g_ours) > 0
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_is_reproducible_for_a_seed(setup, stage):
    """Same inputs and seed -> the same adapter (and score head), whatever the process's random state before
    the stage: new weights are initialised under the stage's seed."""
    import torch
    from safetensors.torch import load_file

    s = setup
    if stage == "reward":
        assert run_sft(s) == 0
    run = run_sft if stage == "sft" else run_rm
    weights = []
    for prior in (1, 2):
        torch.manual_seed(prior)
        assert run(s, "--force", "true") == 0
        weights.append(load_file(str(s["artifacts"] / stage / "adapter" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_lora_layers_puts_the_adapter_on_the_top_layers(setup, capsys, stage):
    """``--lora_layers 1`` on the 2-layer tiny model: LoRA weights in layer 1 only (plus the reward stage's
    score head); an out-of-range count is a one-line error that writes nothing."""
    from safetensors.torch import load_file

    s = setup
    if stage == "reward":
        assert run_sft(s) == 0
    run = run_sft if stage == "sft" else run_rm
    assert run(s, "--lora_layers", "1") == 0
    keys = load_file(str(s["artifacts"] / stage / "adapter" / "adapter_model.safetensors")).keys()
    lora = [k for k in keys if "lora_" in k]
    assert lora and all(".layers.1." in k for k in lora), lora
    assert len(lora) == 2 * 7  # A and B of q, k, v, o, gate, up, down
    assert ("score" in " ".join(keys)) == (stage == "reward")
    manifest = json.loads((s["artifacts"] / stage / "manifest.json").read_text())
    assert manifest["config"]["model"]["lora_layers"] == 1

    before = (s["artifacts"] / stage / "manifest.json").read_text()
    capsys.readouterr()
    assert run(s, "--lora_layers", "3", "--force", "true") == 2
    assert "--lora_layers 3: the model has 2 layers; pass 1..2" in error_line(capsys)
    assert (s["artifacts"] / stage / "manifest.json").read_text() == before


class _Killed(Exception):
    """Stands in for a kill in the middle of training."""


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_plain_rerun_after_a_kill_continues_from_the_newest_checkpoint(setup, tmp_path, monkeypatch, stage):
    """A run killed at step 3 of 4 (checkpoints every step) resumes from checkpoint-2 on the same command and
    ends with the adapter of an uninterrupted run; the run directory goes once the stage is published."""
    import transformers
    from safetensors.torch import load_file

    def run(s, *extra):
        if stage == "sft":
            return run_sft(s, "--max_steps", "4", "--save_steps", "1", *extra)
        return run_rm(s, "--max_steps", "4", "--save_steps", "1", *extra)

    runs = {}
    for name in ("full", "killed"):
        runs[name] = {**setup, "artifacts": tmp_path / name}
        if stage == "reward":
            assert run_sft(runs[name]) == 0  # the same SFT model under both
    assert run(runs["full"]) == 0

    real_step = transformers.Trainer.training_step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", dying_step)
    with pytest.raises(_Killed):
        run(runs["killed"])
    monkeypatch.setattr(transformers.Trainer, "training_step", real_step)
    art_dir = runs["killed"]["artifacts"]
    assert not (art_dir / stage).exists()
    assert sorted(p.name for p in (art_dir / f"{stage}-run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    assert run(runs["killed"]) == 0
    assert not (art_dir / f"{stage}-run").exists()
    want = load_file(str(runs["full"]["artifacts"] / stage / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(art_dir / stage / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    full_metrics = json.loads((runs["full"]["artifacts"] / stage / "manifest.json").read_text())["metrics"]
    metrics = json.loads((art_dir / stage / "manifest.json").read_text())["metrics"]
    assert full_metrics["train_loss_from_step"] == 0 and metrics["train_loss_from_step"] == 2
    assert metrics["train_loss"] > 0 and metrics["train_steps"] == 4


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_rerun_after_a_kill_between_the_final_checkpoint_and_publish(setup, monkeypatch, capsys, stage):
    """Killed after the last step's checkpoint, before the stage is in place: the rerun trains no step (HF's
    loop would run one past max_steps), publishes that checkpoint's adapter, and records no loss instead of
    HF's 0.0 for zero steps."""
    from safetensors.torch import load_file

    import pipeline.modeling

    def run():
        return (run_sft if stage == "sft" else run_rm)(setup, "--max_steps", "2", "--save_steps", "1")

    if stage == "reward":
        assert run_sft(setup) == 0

    def dying_publish(*a, **k):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(pipeline.modeling, "publish_lora", dying_publish)
        with pytest.raises(_Killed):
            run()
    art_dir = setup["artifacts"]
    final = load_file(str(art_dir / f"{stage}-run" / "checkpoint-2" / "adapter_model.safetensors"))
    capsys.readouterr()
    assert run() == 0
    assert "no step ran: resumed at the final checkpoint" in capsys.readouterr().out
    metrics = json.loads((art_dir / stage / "manifest.json").read_text())["metrics"]
    assert metrics["train_loss"] is None and metrics["train_loss_from_step"] == 2 and metrics["train_steps"] == 2
    assert [h["step"] for h in metrics["log_history"] if "loss" in h] == [1, 2]
    got = load_file(str(art_dir / stage / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(got[k], final[k], rtol=0, atol=0, msg=k)


def test_checkpoints_of_another_run_are_refused_unless_forced(setup, capsys):
    assert run_sft(setup, "--max_steps", "2", "--save_steps", "1") == 0
    run_dir = setup["artifacts"] / "sft-run"
    run_dir.mkdir()
    (run_dir / "checkpoint-1").mkdir()
    (run_dir / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run_dir / "fingerprint").write_text("another run")
    assert run_sft(setup, "--max_steps", "3", "--save_steps", "1") == 2
    assert "holds an interrupted run with other inputs or config" in error_line(capsys)
    assert (run_dir / "checkpoint-1").exists()
    assert run_sft(setup, "--max_steps", "3", "--save_steps", "1", "--force") == 0
    assert not run_dir.exists()


def test_model_flags_are_applied_or_refused(setup, capsys):
    """No ModelConfig flag is recorded and ignored: --use_dora trains a DoRA adapter, quantised loading is refused."""
    assert run_sft(setup, "--load_in_4bit", "true") == 2
    assert "--load_in_4bit: quantised (QLoRA) loading is not supported yet" in error_line(capsys)
    assert not (setup["artifacts"] / "sft").exists()
    assert run_sft(setup, "--use_dora", "true") == 0
    adapter = json.loads((setup["artifacts"] / "sft" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True


def test_every_row_longer_than_max_length_is_one_line(setup, capsys):
    assert run_sft(setup, "--max_length", "4") == 2
    assert "every row of the SFT data is longer than --max_length 4" in error_line(capsys)
    assert not (setup["artifacts"] / "sft").exists()


def test_a_moved_artifact_directory_still_skips_completed_stages(setup, capsys):
    """Fingerprints count inputs by content hash, not by location: SFT and reward moved elsewhere are still
    complete for the same command, and the reward stage's record of its SFT input still matches."""
    import shutil

    s = setup
    assert run_sft(s) == 0 and run_rm(s) == 0
    moved = s["artifacts"].parent / "moved"
    shutil.move(str(s["artifacts"]), moved)
    capsys.readouterr()
    assert run_sft({**s, "artifacts": moved}) == 0 and run_rm({**s, "artifacts": moved}) == 0
    out = capsys.readouterr().out
    assert out.count("is complete for these inputs and config; skipping") == 2, out
    assert run_rm({**s, "artifacts": moved}, "--seed", "3") == 0  # another setting: trained again
    assert "skipping" not in capsys.readouterr().out


@pytest.mark.parametrize("bf16, flash", [("true", False), ("false", True)], ids=["bf16", "fp32"])
def test_sft_trains_through_the_math_attention_kernel_on_a_cpu_in_bf16(setup, monkeypatch, fresh_accelerate_state,
                                                                        bf16, flash):  # fmt: skip
    """Under bf16 autocast on a CPU every forward SFT trains through takes the math attention kernel (its backward
    is the faster there: pipeline.modeling.training_attention); in fp32 the default (flash) stays."""
    import torch.nn.functional as F

    real, trained = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.grad_fn is not None:
            trained.append(out.grad_fn.name())
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert run_sft(setup, "--bf16", bf16) == 0
    assert trained and all(("Flash" in name) == flash for name in trained)
