"""The real embedded model (the only tests that load SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_path():
    from pipeline.embedded import ensure_embedded_model

    return Path(ensure_embedded_model())


def test_converted_copy_is_plain_safetensors_with_distinct_pad(embedded_path):
    config = json.loads((embedded_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (embedded_path / "model.safetensors").exists()
    assert not list(embedded_path.glob("*.bin")) and not list(embedded_path.glob("*.gguf"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id


def test_embedded_model_answers_and_trains(embedded_path):
    """It answers a simple question, and a LoRA step on it is finite (no GGUF leftovers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    model = AutoModelForCausalLM.from_pretrained(embedded_path).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    lm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    lm.train()
    loss = lm(input_ids=out, labels=out).loss
    loss.backward()
    assert torch.isfinite(loss)
