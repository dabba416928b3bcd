"""Tests of ``pipeline/ppo/checkpoint.py``: a checkpoint restores trainable weights, optimizer, scheduler and
RNG exactly; only complete checkpoints are found; mismatches are one-line errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.ppo import checkpoint as ckpt
from tests.conftest import make_causal_lm


@pytest.fixture
def run(tmp_path, tiny_tok, fresh_accelerate_state):
    """A tiny LoRA policy with an optimizer and scheduler that have taken two steps."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = get_peft_model(make_causal_lm(tmp_path / "base", tiny_tok), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    x = torch.tensor([[1, 5, 9, 12]])
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return Accelerator(cpu=True), model, optimizer, scheduler, tmp_path / "checkpoints"


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(run):
    acc, model, optimizer, scheduler, root = run
    state = {"iteration": 2, "cursor": 16, "history": [{"iteration": 1}, {"iteration": 2}]}
    path = ckpt.save(root, 2, acc, model, optimizer, scheduler, state, model)
    assert path == root / "iter-000002" and (path / ckpt.COMPLETE).exists()
    assert (path / "policy_adapter" / "adapter_model.safetensors").exists()
    weights, lr = _trainable(model), scheduler.get_last_lr()
    opt_state = {
        i: {k: torch.as_tensor(v).clone() for k, v in st.items()} for i, st in optimizer.state_dict()["state"].items()
    }

    # Move everything on, then restore.
    x = torch.tensor([[2, 6, 7]])
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    scheduler.step()
    assert any(not torch.equal(weights[n], p) for n, p in _trainable(model).items())

    loaded = ckpt.load(path, acc, model, optimizer, scheduler)
    assert loaded["iteration"] == 2 and loaded["cursor"] == 16 and loaded["history"] == state["history"]
    for n, p in _trainable(model).items():
        assert torch.equal(weights[n], p), n
    restored = optimizer.state_dict()
    for i, st in opt_state.items():
        for k, v in st.items():
            assert torch.equal(v, torch.as_tensor(restored["state"][i][k])), (i, k)
    assert scheduler.get_last_lr() == lr


def test_rng_streams_continue_as_after_the_save(run):
    acc, model, optimizer, scheduler, root = run
    path = ckpt.save(root, 1, acc, model, optimizer, scheduler, {"iteration": 1}, model)
    expected_torch, expected_py, expected_np = torch.rand(4), random.random(), np.random.rand(2)
    torch.rand(100), random.random(), np.random.rand(7)  # the streams move on
    ckpt.load(path, acc, model, optimizer, scheduler)
    assert torch.equal(torch.rand(4), expected_torch)
    assert random.random() == expected_py
    assert np.array_equal(np.random.rand(2), expected_np)


def test_latest_is_the_newest_complete_checkpoint(run):
    acc, model, optimizer, scheduler, root = run
    for it in (1, 3):
        ckpt.save(root, it, acc, model, optimizer, scheduler, {"iteration": it}, model)
    # A checkpoint killed mid-save has no checkpoint.json: it is never picked.
    (root / "iter-000005").mkdir()
    (root / "iter-000005" / "state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["iter-000001", "iter-000003"]
    assert ckpt.resolve(root, "latest") == root / "iter-000003"
    assert ckpt.resolve(root, str(root / "iter-000001")) == root / "iter-000001"
    with pytest.raises(PipelineError, match="not a complete PPO checkpoint"):
        ckpt.resolve(root, str(root / "iter-000005"))
    with pytest.raises(PipelineError, match="no complete checkpoint"):
        ckpt.resolve(root / "nothing-here", "latest")


def test_load_refuses_another_setup(run, tmp_path, tiny_tok):
    from peft import LoraConfig, get_peft_model

    acc, model, optimizer, scheduler, root = run
    path = ckpt.save(root, 1, acc, model, optimizer, scheduler, {"iteration": 1}, model)
    other = get_peft_model(make_causal_lm(tmp_path / "other", tiny_tok), LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(PipelineError, match="trainable parameters"):
        ckpt.load(path, acc, other, optimizer, scheduler)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(PipelineError, match="written by 2 processes"):
        ckpt.load(path, acc, model, optimizer, scheduler)
