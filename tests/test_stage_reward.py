"""Tests of the reward stage (``pipeline/stage_reward.py``) on tiny models: the SFT -> reward chain and
the input-stage errors."""

from __future__ import annotations

import json

import pytest

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
    assert m["metrics"]["test"]["num_pairs"] == 16
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


def test_pairwise_accuracy_counts_ties_as_wrong(monkeypatch):
    """Held-out accuracy: the share of pairs whose chosen reply scores strictly above the rejected one."""
    import torch

    import reward_models.learned
    from pipeline.stage_reward import pairwise_accuracy

    table = {"c0": 3.0, "c1": 1.0, "c2": 2.0, "c3": 2.0, "r0": 1.0, "r1": 2.0, "r2": 1.0, "r3": 2.0}
    monkeypatch.setattr(
        reward_models.learned,
        "reward_pair_scores",
        lambda model, tok, prompts, chosen, rejected, bs: (
            torch.tensor([table[r] for r in chosen]),
            torch.tensor([table[r] for r in rejected]),
        ),
    )
    pairs = [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"content": f"c{i}"}],
            "rejected": [{"content": f"r{i}"}],
        }
        for i in range(4)
    ]
    out = pairwise_accuracy(None, None, pairs)
    # wins on pairs 0 and 2, a loss on 1, a tie on 3 (counted wrong); margins 2, -1, 1, 0
    assert out == {"accuracy": 0.5, "margin_mean": 0.5, "num_pairs": 4}


def test_reward_adapters_of_two_seeds_form_an_ensemble_on_one_base(setup):
    """Two reward stages on one SFT model (``--seed``): PPO's ensemble loader keeps one base and switches
    adapters, and each member scores exactly as that stage's merged ``reward/model`` does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward_models.learned import load_reward_members, load_reward_tokenizer, reward_scores

    s = setup
    assert run_sft(s) == 0
    sft_model = str(s["artifacts"] / "sft" / "model")
    dirs = [s["artifacts"], s["artifacts"].parent / "rm-7"]
    assert run_rm(s) == 0
    assert run_rm({**s, "artifacts": dirs[1]}, "--model_name_or_path", sft_model, "--seed", "7") == 0
    paths = [str(d / "reward" / "adapter") for d in dirs]
    tok = load_reward_tokenizer(sft_model)
    members = load_reward_members(paths, tok, torch.float32, torch.device("cpu"), batch_size=4)
    assert members[0].model is members[1].model  # one base, two adapters
    prompts = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(6)]
    responses = ["A short answer.", "Another, longer answer about it.", "x", "Yes.", "No, not at all.", "Maybe"]
    scores = [m(prompts, responses) for m in members]
    assert (scores[0] - scores[1]).abs().max() > 1e-4  # different seeds, different reward models
    for d, got in zip(dirs, scores):
        merged = AutoModelForSequenceClassification.from_pretrained(d / "reward" / "model").eval()
        want = reward_scores(merged, load_reward_tokenizer(str(d / "reward" / "model")), prompts, responses)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_group_by_length_batches_pairs_of_similar_length(tmp_path, tiny_tok):
    """``--train_sampling_strategy group_by_length``: the pair's longer reply is the sampler's length, the column
    survives until the sampler reads it, and batches hold pairs of similar length. transformers' sampler sorts
    random megabatches (here 4 batches each) by length, so at most one batch per megabatch mixes the long pairs
    with the short ones; in random batches nearly every batch would."""
    from datasets import Dataset
    from trl import RewardConfig

    from pipeline.stage_reward import reward_trainer_class
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok)
    words = [1, 2, 3, 4, 24, 26, 28, 30] * 8  # 64 pairs: short and long
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Explain volcanoes."}],
                               "chosen": [{"role": "assistant", "content": "lava " * n}],
                               "rejected": [{"role": "assistant", "content": "rock"}]} for n in words])  # fmt: skip
    args = RewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True,
                        report_to="none", train_sampling_strategy="group_by_length", max_steps=2)  # fmt: skip
    trainer = reward_trainer_class()(model=model, args=args, train_dataset=rows, processing_class=tiny_tok)
    data = trainer.train_dataset
    assert data["length"] == [max(len(c), len(r)) for c, r in zip(data["chosen_ids"], data["rejected_ids"])]
    cut = (min(data["length"]) + max(data["length"])) / 2
    mixed = 0
    for batch in trainer.get_train_dataloader():
        n = batch["input_ids"].shape[0] // 2  # chosen rows first, then the rejected ones
        long = (batch["attention_mask"][:n].sum(1) > cut).tolist()
        mixed += any(long) and not all(long)
    assert mixed <= 4  # one per megabatch at most
    assert trainer.train().global_step == 2  # the collator ignores the length column


@pytest.mark.parametrize("share_prompts", [True, False])
def test_pair_forward_loss_matches_one_forward(tmp_path, tiny_tok, monkeypatch, share_prompts):
    """On one CPU process the reward loss runs a batch with each pair's prompt once (``share_prompts``) or, where
    that cannot apply, as length-sorted chunks of rows cut to their own longest: fewer tokens computed, the same
    loss and gradients as TRL's one forward over the padded batch. A batch that is not right-padded runs as one
    forward."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline import stage_reward
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok, initializer_range=0.2)
    words = [1, 30, 3, 9, 20, 2, 15, 5]
    topics = ["volcanoes", "the moon and the tides", "rivers", "coffee", "plants", "France", "oceans", "beans"]
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Explain {t}." + " Briefly." * (n % 3)}],
                               "chosen": [{"role": "assistant", "content": "lava " * n}],
                               "rejected": [{"role": "assistant", "content": "rock " * (n // 2 + 1)}]}
                              for n, t in zip(words, topics)])  # fmt: skip
    args = RewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, use_cpu=True, bf16=False,
                        report_to="none", center_rewards_coefficient=0.01)  # fmt: skip
    trainer = stage_reward.reward_trainer_class()(
        model=model, args=args, train_dataset=rows, processing_class=tiny_tok
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    monkeypatch.setattr(stage_reward, "PAIR_CHUNK_TOKENS", batch["input_ids"].shape[1] * 4)  # two packs
    if not share_prompts:
        monkeypatch.setattr(stage_reward.PairForward, "_grouping", lambda *_: None)
    shapes = []  # what the transformer runs: the model's own forward and the shared-prefix path both call it
    model.model.register_forward_pre_hook(lambda _m, a, kw: shapes.append(kw.get("input_ids", *a[:1]).shape),
                                          with_kwargs=True)  # fmt: skip

    def loss_and_grads(compute_loss, inputs):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(inputs))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    split_loss, split_grads = loss_and_grads(type(trainer).compute_loss, batch)
    split_shapes, shapes[:] = list(shapes), []
    plain_loss, plain_grads = loss_and_grads(RewardTrainer.compute_loss, batch)
    assert shapes == [batch["input_ids"].shape]
    tokens = sum(r * w for r, w in split_shapes)
    if share_prompts:  # one packed sequence: the common start once, each pair's prompt once, the rows' own tokens
        assert all(r == 1 for r, _ in split_shapes)  # packed sequences, no padded rows
        assert tokens < 0.75 * int(batch["attention_mask"].sum())  # fewer than the real tokens: no padding
    else:
        assert len(split_shapes) >= 3 and sum(r for r, _ in split_shapes) == 16
        assert tokens < 0.8 * batch["input_ids"].numel()
    torch.testing.assert_close(split_loss, plain_loss)
    for got, want in zip(split_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    left = {k: v.flip(1) if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}  # left-padded
    shapes[:] = []
    loss_and_grads(type(trainer).compute_loss, left)
    assert shapes == [batch["input_ids"].shape]
