"""SFT -> RM chain on tiny models, the artifact contract, and bad-input behaviour."""

from __future__ import annotations

import json

import pytest

from pipeline import artifacts as art
from pipeline.stage_rm import cli as rm_cli
from pipeline.stage_sft import cli as sft_cli
from tests.conftest import make_causal_lm, write_jsonl

FAST = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
        "--lora_r", "4", "--lora_alpha", "8"]


def error_line(capsys) -> str:
    """The one `error: ...` line a failed stage prints (progress bars may precede it)."""
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def sft_rows(n=16):
    return [{"prompt": [{"role": "user", "content": f"Explain volcanoes, take {i}. Answer in all lowercase."}],
             "completion": [{"role": "assistant", "content": "volcanoes erupt when magma rises."}]} for i in range(n)]


def pref_rows(n=16):
    return [{"prompt": [{"role": "user", "content": f"Explain volcanoes, take {i}. Answer in all lowercase."}],
             "chosen": [{"role": "assistant", "content": "volcanoes erupt when magma rises."}],
             "rejected": [{"role": "assistant", "content": "Volcanoes erupt when magma rises."}]} for i in range(n)]


@pytest.fixture
def setup(tmp_path, tiny_tok):
    base = tmp_path / "base"
    make_causal_lm(base, tiny_tok)
    data = tmp_path / "data"
    data.mkdir()
    return {
        "base": base, "artifacts": tmp_path / "artifacts",
        "sft": write_jsonl(data / "sft.jsonl", sft_rows()), "pref": write_jsonl(data / "pref.jsonl", pref_rows()),
    }


def run_sft(s, *extra):
    return sft_cli(["--model_name_or_path", str(s["base"]), "--dataset_name", str(s["sft"]),
                    "--artifact_dir", str(s["artifacts"]), *FAST, *extra])


def run_rm(s, *extra):
    return rm_cli(["--dataset_name", str(s["pref"]), "--artifact_dir", str(s["artifacts"]), *FAST, *extra])


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


def test_rm_before_sft_says_what_to_run(setup, capsys):
    assert run_rm(setup) == 2
    err = error_line(capsys)
    assert "rlhf sft" in err and "missing" in err
    assert not (setup["artifacts"] / "reward").exists()


def test_incomplete_input_stage_is_refused(setup, capsys):
    (setup["artifacts"] / "sft" / "model").mkdir(parents=True)  # a crashed stage without manifest
    assert run_rm(setup) == 2
    assert "incomplete" in error_line(capsys)


def test_bad_data_leaves_previous_artifact_untouched(setup, tmp_path, capsys):
    s = setup
    assert run_sft(s) == 0
    before = (s["artifacts"] / "sft" / "manifest.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    rc = sft_cli(["--model_name_or_path", str(s["base"]), "--dataset_name", str(bad),
                  "--artifact_dir", str(s["artifacts"]), *FAST, "--force"])
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
    rc = sft_cli(["--model_name_or_path", str(tmp_path / "nan_base"), "--dataset_name", str(s["sft"]),
                  "--artifact_dir", str(s["artifacts"]), *FAST])
    assert rc == 2 and "nothing was written" in error_line(capsys)
    assert not (s["artifacts"] / "sft").exists() and not (s["artifacts"] / ".sft.staging").exists()


def test_unknown_flag_is_an_error(setup, capsys):
    assert run_sft(setup, "--not_a_flag", "1") == 2
    assert "--not_a_flag" in error_line(capsys)


def test_staging_is_removed_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with art.stage_output(tmp_path, "sft", {"a": 1}, {}) as out:
            (out.path / "partial.bin").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / ".sft.staging").exists() and not (tmp_path / "sft").exists()


def test_publish_requires_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="without a manifest"):
        with art.stage_output(tmp_path, "sft", {}, {}):
            pass
    assert not (tmp_path / "sft").exists()


def test_reward_scores_keep_input_order_across_length_sorted_batches(tmp_path, tiny_tok):
    """Scoring sorts by length to pad less; each score must still belong to its own input."""
    import torch

    from pipeline.modeling import reward_scores
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok).eval()
    prompts = [[{"role": "user", "content": f"Explain volcanoes, take {i}."}] for i in range(7)]
    responses = ["lava " * n + "flows." for n in (9, 1, 5, 12, 3, 0, 7)]
    one_by_one = torch.cat([reward_scores(model, tiny_tok, [p], [r], batch_size=1) for p, r in zip(prompts, responses)])
    batched = reward_scores(model, tiny_tok, prompts, responses, batch_size=3)
    assert one_by_one.unique().numel() == len(responses)  # distinct scores, so a permutation would show
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert reward_scores(model, tiny_tok, [], [], batch_size=3).numel() == 0


def test_completion_loss_matches_trl_loss_and_gradients(setup, tiny_tok, fresh_accelerate_state):
    """The SFT stage's completion-position loss equals TRL's fused-head loss, value and gradients."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from pipeline.data import load_for
    from pipeline.modeling import ensure_distinct_pad_token
    from pipeline.stage_sft import completion_trainer_class

    rows = sft_rows(6) + [{"prompt": [{"role": "user", "content": "Hi."}],  # prompts of different lengths
                           "completion": [{"role": "assistant", "content": "hello there, how are you today?"}]}]
    data = write_jsonl(setup["base"].parent / "mixed.jsonl", rows)
    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    ensure_distinct_pad_token(tiny_tok, model)
    args = SFTConfig(output_dir=str(setup["base"].parent / "out"), per_device_train_batch_size=7, report_to="none",
                     use_cpu=True, completion_only_loss=True, max_length=128)
    trainer = completion_trainer_class()(model=model, args=args, processing_class=tiny_tok,
                                         train_dataset=load_for("sft", str(data), "train", None, None))
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
