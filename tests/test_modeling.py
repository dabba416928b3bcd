"""Tests of ``pipeline/modeling.py``: pad tokens, adapter placement, the merged model and the finite check."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from tests.conftest import make_causal_lm, make_seq_cls


def test_top_layers_and_linear_leaf_names(tmp_path, tiny_tok):
    from pipeline.modeling import linear_leaf_names, top_layers

    rm = make_seq_cls(tmp_path / "rm", tiny_tok)  # 2 layers
    assert top_layers(rm, None) is None and top_layers(rm, 1) == [1] and top_layers(rm, 2) == [0, 1]
    for bad in (0, 3):
        with pytest.raises(PipelineError, match="--lora_layers .*: the model has 2 layers; pass 1..2"):
            top_layers(rm, bad)
    assert linear_leaf_names(rm) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_config_on_top_layers(tmp_path, tiny_tok):
    from trl import ModelConfig

    from pipeline.modeling import lora_config

    model = make_causal_lm(tmp_path / "m", tiny_tok)
    args = ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    every = lora_config(args, "CAUSAL_LM")
    assert every.target_modules == "all-linear" and every.layers_to_transform is None and every.r == 4
    top = lora_config(args, "SEQ_CLS", ["score"], model, 1, "--value_lora_layers")
    assert top.layers_to_transform == [1] and "q_proj" in top.target_modules and top.modules_to_save == ["score"]


def test_distinct_pad_token(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.modeling import ensure_distinct_pad_token
    from tests.conftest import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token  # as SmolLM2 ships
    model = make_causal_lm(tmp_path / "m", tok)
    ensure_distinct_pad_token(tok, model)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    tok.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").pad_token_id == tok.pad_token_id


def test_load_tokenizer_errors_are_one_line(tmp_path):
    from pipeline.modeling import load_tokenizer

    with pytest.raises(PipelineError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_non_finite_training_is_refused(tmp_path, tiny_tok):
    from types import SimpleNamespace

    from pipeline.modeling import check_finite_training

    model = make_causal_lm(tmp_path / "m", tiny_tok)
    fine = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0}]), model=model)
    check_finite_training(fine, "SFT")
    with pytest.raises(PipelineError, match="SFT: the loss became NaN"):
        check_finite_training(
            SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": float("nan")}]), model=model), "SFT"
        )
    with torch.no_grad():
        next(p for p in model.parameters()).fill_(float("inf"))
    with pytest.raises(PipelineError, match="trainable weights became NaN"):
        check_finite_training(fine, "SFT")


def test_contiguous_head_feeds_the_vocabulary_projection_a_contiguous_input(tmp_path, tiny_tok):
    """transformers slices ``hidden[:, -k:, :]`` before the projection; without the hook torch broadcasts and
    copies the whole weight per row. With it the projection sees a contiguous input and the logits are the same."""
    from peft import LoraConfig, get_peft_model

    from pipeline.modeling import contiguous_head

    model = make_causal_lm(tmp_path / "m", tiny_tok).eval()
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        before = model(input_ids=ids, logits_to_keep=4).logits
    seen = []
    contiguous_head(model)
    contiguous_head(model)  # a second call adds nothing
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))  # the head is not an adapter target
    with torch.no_grad():
        after = peft(input_ids=ids, logits_to_keep=4).logits
        peft.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen == [True] * len(seen) and len(seen) == 3  # the forward, the prefill and one decoding step
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize(
    "precision, tokens, flash",
    [("bf16", 8, False), ("bf16", 161, True), ("no", 8, True)],
    ids=["bf16", "long", "fp32"],
)
def test_training_attention_takes_the_math_kernel_on_a_cpu_in_bf16_for_short_sequences(precision, tokens, flash):
    """On a CPU under bf16, sequences up to MATH_ATTENTION_MAX_TOKENS train through the math attention kernel
    (its backward is the faster there); longer ones, and fp32, keep the default (flash)."""
    import torch.nn.functional as F

    from pipeline.modeling import MATH_ATTENTION_MAX_TOKENS, training_attention

    assert MATH_ATTENTION_MAX_TOKENS == 160
    q = torch.randn(2, 3, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    default = F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn.name()
    assert "Flash" in default  # what the CPU picks unasked, so the check below can tell the kernels apart
    with training_attention(torch.device("cpu"), precision, tokens):
        chosen = F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn.name()
    assert ("Flash" in chosen) == flash


@pytest.mark.parametrize("user_setting", [None, "YES"])
def test_importing_the_pipeline_turns_hub_kernels_off_unless_the_user_set_them(tmp_path, tiny_tok, user_setting):
    """transformers kernelizes every loaded model by default (fetching Hub kernels on a GPU, which raises offline);
    importing ``pipeline`` turns that off, and a user's own ``USE_HUB_KERNELS`` stands."""
    import os
    import subprocess
    import sys

    make_causal_lm(tmp_path / "m", tiny_tok)
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    if user_setting is not None:
        env["USE_HUB_KERNELS"] = user_setting
    code = (
        "import os, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "before = AutoModelForCausalLM.from_pretrained(sys.argv[1]).use_kernels\n"
        "import pipeline\n"
        "after = AutoModelForCausalLM.from_pretrained(sys.argv[1]).use_kernels\n"
        "print(before, os.environ['USE_HUB_KERNELS'], after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env={**env, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out == (["True", "NO", "False"] if user_setting is None else ["True", "YES", "True"])
