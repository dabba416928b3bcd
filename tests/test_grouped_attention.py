"""``pipeline/grouped_attention.py``: the grouped float32 attention against transformers' SDPA function under the
math kernel, on masks with left padding and grouped key/value heads; what it passes on; its switch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.grouped_attention import _mask_terms, grouped_attention, grouped_sdpa


class _Attention(torch.nn.Module):  # what transformers' attention functions read from the module
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _case(dtype, B=3, H=6, KV=2, T=9, D=8, pads=(0, 3, 9), seed=0):
    """Queries ``[B, H, T, D]`` laid out as transformers' projections leave them (transposed views), keys and values
    ``[B, KV, T, D]``, and SDPA's boolean mask with each row's left padding (a row of only padding included)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, KV, D, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, KV, D, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    real = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    return q, k, v, mask, torch.randn(B, T, H, D, generator=gen).to(dtype)


def _run(fn, q, k, v, mask, grad, groups):
    for t in (q, k, v):
        t.grad = None
    with sdpa_kernel(SDPBackend.MATH):
        out, weights = fn(_Attention(groups), q, k, v, mask, dropout=0.0, scaling=0.3)
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in (q, k, v)], weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_equals_sdpa_to_rounding(dtype):
    """Outputs ``[B, T, H, D]`` and the gradients of queries, keys and values match transformers' SDPA function
    (repeated key/value heads, the math kernel) to float32 rounding, and to one bf16 step for bf16 inputs; rows of
    a padded query position come out zero, as SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask, grad = _case(dtype)
    want, want_grads, _ = _run(sdpa_attention_forward, q, k, v, mask, grad, 3)
    got, got_grads, weights = _run(grouped_attention, q, k, v, mask, grad, 3)
    assert weights is None and got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol)
    assert torch.count_nonzero(got[2]) == 0 and torch.count_nonzero(got[1, :3]) == 0  # padded positions
    assert torch.count_nonzero(got[1, 3:]) > 0
    if dtype == torch.bfloat16:  # the same precision as the math kernel: nearly every output the same bits
        assert (got == want).float().mean() > 0.99


def test_grouped_attention_without_a_mask_is_causal():
    """No mask (transformers passes none where no row is padded): causal attention, as SDPA's ``is_causal``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, _, grad = _case(torch.float32, pads=(0, 0, 0))
    want, want_grads, _ = _run(sdpa_attention_forward, q, k, v, None, grad, 3)
    got, got_grads, _ = _run(grouped_attention, q, k, v, None, grad, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_grouped_attention_passes_other_cases_to_sdpa(monkeypatch):
    """Dropout, or no mask with keys longer than the queries, go to transformers' SDPA function unchanged."""
    import transformers.integrations.sdpa_attention as sdpa

    seen = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: seen.append(kw) or ("sdpa", None))
    q, k, v, mask, _ = _case(torch.float32)
    assert grouped_attention(_Attention(3), q, k, v, mask, dropout=0.1)[0] == "sdpa"
    assert grouped_attention(_Attention(3), q[:, :, :4], k, v, None)[0] == "sdpa"
    assert len(seen) == 2 and seen[0]["dropout"] == 0.1
    assert grouped_attention(_Attention(3), q, k, v, mask)[0] != "sdpa"


def test_mask_terms_are_built_once_per_mask_and_follow_its_changes():
    """Every layer passes the same mask: its terms are built once, and again after the mask changes in place."""
    _, _, _, mask, _ = _case(torch.float32)
    bias, keep = _mask_terms(mask, 9, 9, mask.device)
    assert _mask_terms(mask, 9, 9, mask.device)[0] is bias
    assert bias.shape == (3, 1, 1, 9, 9) and keep.shape == (3, 1, 1, 9, 1)
    assert keep[2].sum() == 0 and keep[0].sum() == 9 and keep[1].sum() == 6
    assert torch.isinf(bias[0, 0, 0]).sum() == 36 and (bias[2] == 0).all()  # causal; padded rows see all keys
    mask[0] = False
    again = _mask_terms(mask, 9, 9, mask.device)[0]
    assert again is not bias and (again[0] == 0).all()


def test_grouped_sdpa_switches_sdpa_models_and_restores(tmp_path):
    """Within ``grouped_sdpa`` a transformers model with SDPA attention runs ``grouped_attention`` in each layer
    (its logits match the plain model's to float32 rounding, padded rows included); after it, SDPA again."""
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :3] = 0
    calls = []

    def counted(*a, **kw):
        calls.append(1)
        return grouped_attention(*a, **kw)

    plain = AttentionInterface._global_mapping["sdpa"]
    want = model(input_ids=ids, attention_mask=am).logits
    with grouped_sdpa():
        AttentionInterface._global_mapping["sdpa"] = counted
        got = model(input_ids=ids, attention_mask=am).logits
    assert AttentionInterface._global_mapping["sdpa"] is plain and len(calls) == 2
    torch.testing.assert_close(got[am.bool()], want[am.bool()], rtol=1e-5, atol=1e-5)
