"""Tiny models and tokenizers built from config inside the tests (no hub, no real weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Explain why volcanoes erupt. Answer in all lowercase.",
    "volcanoes erupt when magma rises through the crust and pressure builds.",
    "Describe photosynthesis to a beginner. Do not use any commas.",
    "Plants turn sunlight, water and air into sugar and oxygen.",
    "- first point\n- second point\n- third point",
    '{"answer": "coffee is a drink made from roasted beans."}',
    "Sure! Here is a short answer about the ocean, tides and the moon. Hope this helps!",
    "What is the capital of France? The capital of France is Paris.",
]


def make_tokenizer(path: Path, vocab_size: int = 300, seed_text: list[str] | None = None):
    """A byte-level BPE tokenizer with ChatML specials; pad (<|endoftext|>) differs from eos (<|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator((seed_text or CORPUS) * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


def tiny_llama_config(tok, **kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_causal_lm(path: Path, tok, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tok, **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def make_seq_cls(path: Path, tok, seed: int = 1, **kw):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_llama_config(tok, **kw)
    cfg.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def fake_stage(artifact_dir: Path, stage: str, maker, tok, **kw) -> Path:
    """Write a complete stage directory (model + manifest) as if the stage had run."""
    sub = "policy" if stage == "ppo" else "model"
    d = artifact_dir / stage
    maker(d / sub, tok, **kw)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete", "fingerprint": "test"}))
    return d


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_artifacts(tmp_path, tiny_tok):
    """An artifact dir with tiny sft/ and reward/ stages."""
    art = tmp_path / "artifacts"
    fake_stage(art, "sft", make_causal_lm, tiny_tok)
    fake_stage(art, "reward", make_seq_cls, tiny_tok)
    return art


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(n: int) -> list[dict]:
    topics = ["volcanoes", "coffee", "the ocean", "photosynthesis", "chess", "bread", "rain", "trains"]
    return [{"prompt": [{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}, take {i}."}]}
            for i in range(n)]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test that sets it up itself starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
