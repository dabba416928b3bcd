"""Decoding steps with fused products (``pipeline/fast_decode.py``): the model forward's logits, bit for bit."""

from __future__ import annotations

import pytest
import torch

from pipeline import decoding, fast_decode
from pipeline.packed_linear import pack_linears, supported
from pipeline.sampling import InverseCDFSampler, sampling_kwargs
from pipeline.sequences import position_ids_from
from tests.conftest import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.skipif(not supported(), reason="no oneDNN bf16 linear in this torch build or CPU")

PADDED = ["Explain why volcanoes erupt.", "Plants", "Name three rivers in Europe, please", "Hi there"]
SAME_LENGTH = ["Plants"] * 3  # one prompt, then each row's last token changed


def bf16_lm(tmp_path, **kw):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(tmp_path / "tok")
    make_causal_lm(tmp_path / "lm", tok, initializer_range=0.3, **kw)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16).eval().requires_grad_(False)
    return pack_linears(model), tok


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query attention and plain multi-head
@pytest.mark.parametrize("prompts", [PADDED, SAME_LENGTH], ids=["padded", "same-length"])
def test_every_step_s_logits_are_the_forward_s_as_rows_leave(tmp_path, kv_heads, prompts):
    model, tok = bf16_lm(tmp_path, num_key_value_heads=kv_heads)
    assert fast_decode.unsupported_reason(model) is None
    ids, am = encode(tok, prompts)
    if prompts is SAME_LENGTH:
        ids[:, -1] = torch.tensor([40, 50, 60])
        assert am.all()  # no padding: transformers passes SDPA no mask
    want_logits, cache = decoding.prefill(model, ids, am)
    got_logits, cache2 = decoding.prefill(model, ids, am)
    steps = 9
    decoder = fast_decode.Decoder(model, cache2, am, steps)
    mask, position = am.long(), position_ids_from(am.long())[:, -1:] + 1
    for t in range(steps):
        assert torch.equal(got_logits, want_logits[:, -1:]), t
        token = want_logits[:, -1].float().argmax(-1)
        if t == 4:  # a row finishes: both drop it
            keep = torch.arange(1, len(token))
            cache.batch_select_indices(keep)
            decoder.select(keep)
            token, mask, position = token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        want_logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, cache=cache,
                            use_cache=True).logits  # fmt: skip
        got_logits = decoder.step(token, position)
        position = position + 1
    assert torch.equal(got_logits, want_logits)


@pytest.mark.parametrize("stacked", [False, True], ids=["own-weights", "stacked-in-place"])
def test_sampled_tokens_and_logprobs_equal_the_forward_steps_and_follow_weight_changes(tmp_path, monkeypatch, stacked):
    model, tok = bf16_lm(tmp_path)
    if stacked:  # as MergedPolicy does: q/k/v and gate/up become views of one tensor per layer, packed without a copy
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fast_decode.stack_weights(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        attn = model.model.layers[0].self_attn
        ws = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        assert fast_decode._stack(ws).data_ptr() == ws[0].data_ptr() and torch.equal(
            fast_decode._stack(ws), torch.cat(ws)
        )
        assert fast_decode.unsupported_reason(model) is None
    ids, am = encode(tok, PADDED)
    steps = []
    real = fast_decode.Decoder.step
    monkeypatch.setattr(fast_decode.Decoder, "step", lambda self, *a: steps.append(1) or real(self, *a))

    def sample(fused: bool):
        sampler = InverseCDFSampler(record_logprobs=True)
        torch.manual_seed(7)
        out = decoding.generate(model, ids, am, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, fused_steps=fused,
                                **sampling_kwargs(0.9, 0, 1.0, sampler))  # fmt: skip
        return out, sampler.take_logprobs()

    for change in range(2):
        fused, fused_lp = sample(True)
        assert steps, "the fused steps did not run"
        steps.clear()
        plain, plain_lp = sample(False)
        assert not steps
        assert torch.equal(fused, plain) and torch.equal(fused_lp, plain_lp), change
        with torch.no_grad():  # as MergedPolicy.sync writes a new merge: the fused copies must follow
            model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
            model.model.layers[1].mlp.up_proj.weight.mul_(-1.0)
            model.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # not stacked: its own packed copy follows


def test_models_it_cannot_reproduce_decode_through_their_forward(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tok = bf16_lm(tmp_path)
    fp32 = pack_linears(AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval().requires_grad_(False))
    assert "needs bf16" in fast_decode.unsupported_reason(fp32)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16, attn_implementation="eager")
    assert "'eager'" in fast_decode.unsupported_reason(pack_linears(eager.eval().requires_grad_(False)))
    unpacked = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16).eval().requires_grad_(False)
    assert "PackedLinear" in fast_decode.unsupported_reason(unpacked)
    with torch.autocast("cpu", dtype=torch.float16):
        assert "autocast" in fast_decode.unsupported_reason(model)
    proj = model.model.layers[1].mlp.down_proj
    handle = proj.register_forward_hook(lambda *_: None)  # the decoder would skip the hook
    assert "layer 1's mlp.down_proj" in fast_decode.unsupported_reason(model)
    handle.remove()
    proj.forward = lambda x: x  # a wrapped forward (accelerate's offloading hooks replace it)
    assert "hook-free" in fast_decode.unsupported_reason(model)
    del proj.forward
    assert fast_decode.unsupported_reason(model) is None
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not a plain LlamaForCausalLM" in fast_decode.unsupported_reason(peft)
    assert fast_decode.unsupported_reason(peft.get_base_model()) is not None  # LoRA layers inside


def test_the_prompt_forward_on_stacked_weights_is_the_forward_s_and_packs_no_separate_copies(tmp_path):
    model, tok = bf16_lm(tmp_path)
    ids, am = encode(tok, PADDED)
    want_logits, want_cache = decoding.prefill(model, ids, am)
    stacked = [model.model.layers[i].get_submodule(n) for i in range(len(model.model.layers))
               for n in fast_decode._PROJECTIONS if n not in fast_decode._ALONE]  # fmt: skip
    for mod in stacked:
        mod.drop_packed()
    with fast_decode.stacked_projections(model):
        got_logits, got_cache = decoding.prefill(model, ids, am)
    assert torch.equal(got_logits, want_logits)
    for want, got in zip(want_cache.layers, got_cache.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert all(mod._packed is None for mod in stacked)  # only the stacked copies were used
    assert not any("forward" in vars(mod) for mod in stacked)  # the modules' own forwards are back
    assert fast_decode.unsupported_reason(model) is None
