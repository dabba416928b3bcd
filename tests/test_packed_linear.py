"""Prepacked bf16 linear weights (pipeline/packed_linear.py): the same bits as ``F.linear``, or no packing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.packed_linear import PackedLinear, pack_linears, repack, supported, transposed_supported
from tests.conftest import make_causal_lm

needs_onednn_bf16 = pytest.mark.skipif(not supported(), reason="no oneDNN bf16 linear in this torch build or CPU")


def frozen_linear(n_in: int, n_out: int, bias: bool, seed: int = 0, dtype=torch.bfloat16) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out, bias=bias, dtype=dtype).requires_grad_(False)


@needs_onednn_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_outputs_and_input_gradients_are_the_same_bits_as_f_linear(bias, dtype):
    """A bf16 weight, and a float32 weight under bf16 autocast (the reward stage's frozen base)."""
    lin = frozen_linear(96, 160, bias, dtype=dtype)
    w, b = lin.weight.clone(), None if lin.bias is None else lin.bias.clone()
    pack_linears(lin)
    assert type(lin) is PackedLinear
    for shape in [(1, 96), (8, 96), (29, 96), (300, 96), (8, 1, 96), (3, 40, 96)]:
        x = torch.randn(shape, dtype=dtype)
        assert torch.equal(lin(x), F.linear(x, w, b)), shape  # without autocast: bf16 packed, float32 F.linear
        # float32 input under CPU autocast, as the PPO and evaluation forwards run
        x32 = torch.randn(shape)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lin(x32), F.linear(x32, w, b)), shape
        # an input that requires grad (a frozen base layer inside a trained model): same output, same gradient
        xg = x32.clone().requires_grad_(True)
        ref = x32.clone().requires_grad_(True)
        g = torch.randn(*shape[:-1], 160)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_ref = lin(xg), F.linear(ref, w, b)
        assert torch.equal(out, out_ref), shape
        (out.float() * g).sum().backward()
        (out_ref.float() * g).sum().backward()
        assert torch.equal(xg.grad, ref.grad), shape
    assert lin._packed is not None  # the packed path ran
    assert (lin._packed_t is not None) == transposed_supported()  # and the input gradient on the packed W^T


@needs_onednn_bf16
def test_the_packed_input_gradient_follows_weight_changes():
    lin = pack_linears(frozen_linear(16, 24, bias=False))
    for seed in (0, 1):
        with torch.no_grad():  # an in-place write the version counter sees
            lin.weight.copy_(torch.randn(24, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
        ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(5, 24, dtype=torch.bfloat16)
        (lin(x).float() * g).sum().backward()
        (F.linear(ref, lin.weight).float() * g).sum().backward()
        assert torch.equal(x.grad, ref.grad), seed


@needs_onednn_bf16
def test_packed_copy_follows_weight_changes():
    lin = pack_linears(frozen_linear(16, 24, bias=False))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    lin(x)
    first = lin._packed
    with torch.no_grad():  # an in-place write the version counter sees (MergedPolicy.sync)
        lin.weight.copy_(torch.randn(24, 16, dtype=torch.bfloat16))
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    assert lin._packed is not first
    lin.weight.data.mul_(2)  # invisible to the version counter: repack() is the documented way out
    repack(lin)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    lin.weight = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16), requires_grad=False)  # replaced
    assert torch.equal(lin(x), F.linear(x, lin.weight))


def test_what_is_not_packed_runs_f_linear():
    """float32 products, trainable weights and non-contiguous inputs keep ``nn.Linear.forward``."""
    fp32 = pack_linears(torch.nn.Linear(8, 8).requires_grad_(False))
    x = torch.randn(3, 8)
    assert torch.equal(fp32(x), F.linear(x, fp32.weight, fp32.bias))
    assert getattr(fp32, "_packed", None) is None  # float32 without autocast: MKL's product, as before
    trainable = pack_linears(torch.nn.Linear(8, 8, dtype=torch.bfloat16))
    assert type(trainable) is torch.nn.Linear
    if not supported():
        assert type(pack_linears(frozen_linear(8, 8, bias=False))) is torch.nn.Linear
        return
    lin = pack_linears(frozen_linear(8, 12, bias=True))
    x = torch.randn(6, 16, dtype=torch.bfloat16)[:, ::2]  # non-contiguous
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and lin._packed is None
    lin.weight.requires_grad_(True)  # made trainable after packing: F.linear, and the weight gets its gradient
    lin(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    assert lin.weight.grad is not None and lin._packed is None
    x32 = torch.randn(3, 8)
    lin.weight.requires_grad_(False)
    with pytest.raises(RuntimeError):  # float32 input without autocast: F.linear's own dtype error, not ours
        lin(x32)


@needs_onednn_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_packed_model_generates_scores_and_trains_lora_as_before(tmp_path, tiny_tok, dtype):
    """A tiny Llama in bf16 (PPO's bases) or float32 (the reward stage's), under bf16 autocast: the same logits,
    greedy tokens, LoRA gradients, state dict and deep copy."""
    from peft import LoraConfig, get_peft_model

    base = make_causal_lm(tmp_path / "m", tiny_tok).to(dtype).eval().requires_grad_(False)
    packed = pack_linears(copy.deepcopy(base))
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 7 + 1  # 7 per layer, the head
    assert packed.state_dict().keys() == base.state_dict().keys()
    ids = torch.randint(3, len(tiny_tok), (3, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(packed(input_ids=ids).logits, base(input_ids=ids).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(input_ids=ids, **kw), base.generate(input_ids=ids, **kw))
    assert all(m._packed is not None for m in packed.modules() if isinstance(m, PackedLinear))  # packed path ran
    clone = copy.deepcopy(packed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(clone(input_ids=ids).logits, base(input_ids=ids).logits)

    grads = []
    for model in (base, packed):
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@needs_onednn_bf16
def test_peft_merges_write_through_data_and_repack_follows(tmp_path, tiny_tok):
    """PEFT's merge writes the base weight through ``.data``, which the version counter does not see: the packed
    copy goes stale until ``repack``, as documented; a module moved or cast repacks by itself."""
    from peft import LoraConfig, get_peft_model

    base = make_causal_lm(tmp_path / "m", tiny_tok).to(torch.bfloat16).eval()
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pack_linears(peft)
    q = peft.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)  # packs the base weight
        peft.merge_adapter()
        merged = F.linear(x, q.base_layer.weight)
        assert not torch.equal(q.base_layer(x), merged)  # stale: the documented limit
        repack(peft)
        assert torch.equal(q.base_layer(x), merged)
        peft.unmerge_adapter()  # (in bf16 not the bits of before the merge: merge and unmerge round)
        repack(peft)
        assert torch.equal(q.base_layer(x), F.linear(x, q.base_layer.weight))
        assert not torch.equal(q.base_layer(x), merged)
    lin = pack_linears(frozen_linear(16, 24, bias=False))
    lin(torch.randn(2, 16, dtype=torch.bfloat16))
    assert lin._packed is not None
    lin.float()
    assert lin._packed is None


@needs_onednn_bf16
def test_with_onednn_disabled_packed_layers_run_f_linear():
    """With oneDNN disabled bf16 ``F.linear`` takes another kernel, with other bits: packed layers follow it."""
    lin = pack_linears(frozen_linear(576, 1536, bias=False))
    x = torch.randn(8, 576, dtype=torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(lin(x), F.linear(x, lin.weight))
        assert lin._packed is None
