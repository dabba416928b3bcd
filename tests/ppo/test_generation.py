"""The merged rollout sampler (``pipeline/ppo/generation.py``) and the top-layers value adapter, on tiny
models built in the test."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_causal_lm, make_tokenizer


def _peft_policy(tmp_path, dtype=torch.float32, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(tmp_path / "tok")
    make_causal_lm(tmp_path / "lm", tok, num_hidden_layers=3)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=dtype)
    policy = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", **lora_kw)
    )
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return policy, tok


def _perturb_adapter(policy, seed: int) -> None:
    """What an optimizer step does: change every LoRA weight (B starts at zero, so the delta is non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _batch(tok):
    enc = tok(
        ["Explain why volcanoes erupt.", "Plants turn sunlight into sugar"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    return enc["input_ids"], enc["attention_mask"]


def test_merged_copy_matches_the_adapter_and_follows_updates(tmp_path):
    from pipeline.ppo.generation import MergedPolicy, unsupported_reason

    policy, tok = _peft_policy(tmp_path)
    assert unsupported_reason(policy) is None
    _perturb_adapter(policy, 0)
    sampler = MergedPolicy(policy)
    ids, am = _batch(tok)
    ref_before = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}

    sampler.sync()
    with torch.no_grad():
        want = policy(input_ids=ids, attention_mask=am).logits
        got = sampler.model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        assert torch.equal(
            sampler.generate(input_ids=ids, attention_mask=am, **gen),
            policy.generate(input_ids=ids, attention_mask=am, **gen),
        )

    # An update changes the adapter: the copy is stale until the next sync, then matches again.
    _perturb_adapter(policy, 1)
    with torch.no_grad():
        want = policy(input_ids=ids, attention_mask=am).logits
        assert not torch.allclose(sampler.model(input_ids=ids, attention_mask=am).logits, want, atol=1e-3)
        sampler.sync()
        torch.testing.assert_close(sampler.model(input_ids=ids, attention_mask=am).logits, want, atol=1e-5, rtol=1e-5)

    # The training module's base weights (the reference policy) are untouched, and nothing is shared with the copy.
    for k, v in policy.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, ref_before[k]), k
    copy_ptrs = {p.data_ptr() for p in sampler.model.parameters()}
    assert not copy_ptrs & {p.data_ptr() for p in policy.parameters()}
    assert sampler.model.lm_head.weight is sampler.model.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize("autocast", [False, True])
def test_merged_copy_in_bf16_rounds_once(tmp_path, autocast):
    """bf16 bases: the copy holds ``round_bf16(W + delta)`` computed in float32 (one rounding, not two). Under
    bf16 autocast, as the rollout syncs, the delta itself is bf16 and the sum is one bf16 add: the same bits."""
    from contextlib import nullcontext

    from pipeline.ppo.generation import MergedPolicy, lora_layers

    policy, _ = _peft_policy(tmp_path, dtype=torch.bfloat16)
    _perturb_adapter(policy, 2)
    sampler = MergedPolicy(policy)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    versions = {n: p._version for n, p in sampler.model.named_parameters()}
    with context, torch.no_grad():
        sampler.sync()
        layers = lora_layers(policy)
        assert layers
        for name, layer in layers.items():
            delta = layer.get_delta_weight("default")
            assert delta.dtype == (torch.bfloat16 if autocast else torch.float32)
            want = (layer.base_layer.weight.float() + delta.float()).to(torch.bfloat16)
            got = sampler.model.get_submodule(name).weight
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
            assert got._version > versions[f"{name}.weight"], name  # what tells packed copies to follow
    assert any(layer.scaling["default"] == 2 for layer in layers.values())  # sync's own delta (_delta_weight)


def test_unsupported_adapters_fall_back(tmp_path):
    from pipeline.ppo.generation import unsupported_reason

    policy, _ = _peft_policy(tmp_path, use_dora=True)
    assert "DoRA" in unsupported_reason(policy)


def test_sharded_weights_are_named():
    """FSDP and ZeRO-3 hold a shard of each weight per process: no merged copy, and the PPO stage refuses them."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline.ppo.generation import sharded_weights

    def acc(kind, zero_stage=None):
        plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert sharded_weights(acc(DistributedType.FSDP)) == "FSDP"
    assert sharded_weights(acc(DistributedType.DEEPSPEED, 3)) == "DeepSpeed ZeRO-3"
    assert sharded_weights(acc(DistributedType.DEEPSPEED, 2)) is None
    assert sharded_weights(acc(DistributedType.MULTI_GPU)) is None
    assert sharded_weights(acc(DistributedType.NO)) is None
