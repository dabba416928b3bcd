"""Attention for short bf16 training forwards on a CPU: the query heads grouped per key/value head, in float32.

transformers' SDPA path, given a padding mask, copies every key and value head once per query head of its group
(``repeat_kv``), and torch's math kernel, which is the faster one for a CPU's bf16 backward at these lengths
(``pipeline.modeling.training_attention``), then turns the boolean mask into an additive one, scales the query and
the keys by the square root of the scale each, and looks for rows with no key left (``_safe_softmax``), in every
layer and again in the backward. ``grouped_attention`` computes the same attention in the same precision as that
kernel (float32 scores, softmax and weighted sum from bf16 inputs, one rounding to bf16 at the end) with:

- the query heads of a group as one ``[group x positions, head_dim]`` operand against their shared keys and
  values: no copies, and their backward sums no copies either;
- the additive mask built once per mask, not per layer (``_mask_terms``); a row with no key left (a left-padding
  position, whose output nothing reads) gets SDPA's zeros through a multiplication instead of a search;
- one scaling of the scores instead of two of the operands.

It rounds differently from the math kernel (about one output in 7,000 differs by one bf16 step in
``tests/test_grouped_attention.py``), so it changes what a run computes at the rounding level; PPO's multi-seed
benchmark decides whether that matters (docs/results.md). Anything outside its case (dropout, soft-capping,
sinks, a position bias, keys longer than the queries without a mask) goes to transformers' SDPA function.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# The one mask whose terms were built last, its version, and the terms: every layer of a forward passes the same
# mask tensor.
_LAST: list = [None, None, None]


def _mask_terms(mask: Tensor | None, T: int, S: int, device) -> tuple[Tensor, Tensor]:
    """``(bias [B or 1, 1, 1, T, S] float32: 0 where a query may attend, -inf elsewhere, and 0 on a row with no key
    at all; keep [B or 1, 1, 1, T, 1] float32: 0 on those rows, else 1)`` for a boolean (True = attend) or additive
    float ``mask`` ``[B or 1, 1, T, S]``, or the causal mask where ``mask`` is None."""
    if mask is not None and _LAST[0] is mask and _LAST[1] == mask._version:
        return _LAST[2]
    if mask is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > float("-inf")
    empty = ~allowed.any(-1, keepdim=True)  # [B, 1, T, 1]
    if mask is None or mask.dtype == torch.bool:
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
    else:
        bias = mask.float()
    terms = bias.masked_fill(empty, 0.0).unsqueeze(2), (~empty).float().unsqueeze(2)
    if mask is not None:
        _LAST[:] = mask, mask._version, terms
    return terms


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):  # fmt: skip
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key`` and ``value`` ``[B, KV, S, D]``
    (the key/value heads, not repeated) -> ``([B, T, H, D] in the query's dtype, None)``, as
    ``sdpa_attention_forward`` returns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, T, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    other = (dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
             or kwargs.get("s_aux") is not None or H % KV or value.shape[-1] != D
             or (attention_mask is None and (S != T or not causal)) or kwargs.get("output_attentions"))  # fmt: skip
    if other:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    G = H // KV
    scale = scaling if scaling is not None else D**-0.5
    bias, keep = _mask_terms(attention_mask, T, S, query.device)
    with torch.autocast(query.device.type, enabled=False):  # float32 products, as the math kernel's
        q = query.to(torch.float32, memory_format=torch.contiguous_format).reshape(B, KV, G * T, D)
        scores = torch.matmul(q, key.float().transpose(-2, -1)).view(B, KV, G, T, S)
        probs = torch.softmax(scores.mul_(scale).add_(bias), dim=-1)
        out = torch.matmul(probs.view(B, KV, G * T, S), value.float()).view(B, KV, G, T, D).mul_(keep)
    out = out.view(B, H, T, D).transpose(1, 2)
    return out.to(query.dtype, memory_format=torch.contiguous_format).contiguous(), None  # one copy in bf16


@contextlib.contextmanager
def grouped_sdpa():
    """Within it, every model whose ``config._attn_implementation`` is ``"sdpa"`` runs ``grouped_attention``
    (transformers looks the function up at each layer's call); the masks they build stay SDPA's. For one thread's
    forwards, and the backward of those forwards runs the same function's graph wherever it is called."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    before = mapping["sdpa"]
    mapping["sdpa"] = grouped_attention
    try:
        yield
    finally:
        mapping["sdpa"] = before
        _LAST[:] = None, None, None
