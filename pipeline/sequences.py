"""Token-sequence helpers shared by the PPO trainer and the evaluation.

A batch is a left-padded prompt followed by a right-padded response: ``query_response`` ``[B, P+R]``.
The response mask is 1 on response tokens up to and including the first EOS and 0 after, so padding
never decides where a response ends: the EOS position does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.ppo.core import token_logprobs


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them (so log-probs match sampling)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_mask(responses: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """``(mask [B, R] bool, has_eos [B] bool)``: valid = up to and including the first EOS."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(1)
    # Index of the first EOS, or R when there is none.
    first = torch.where(
        has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    )
    idx = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return idx <= first.unsqueeze(1), has_eos


def response_logits(logits: Tensor, response_length: int, temperature: float) -> Tensor:
    """Logits that predicted the ``response_length`` response tokens (the sequence's last ones),
    scaled by the sampling temperature ([N+] detail). ``logits`` may cover every position or only
    the last ``response_length + 1`` (``logits_to_keep``).

    Upcast to float32 first: Accelerate's mixed-precision wrapper hands the policy's logits back in
    float32 while the reference's (adapter off, called directly) stay bf16, and dividing bf16 by the
    temperature rounds, so policy and reference would differ at the start. The trainer and the evaluation take
    log-probs through ``core.token_logprobs``, which reads the same positions without building this tensor.
    """
    return logits[:, -response_length - 1 : -1].float() / temperature


def response_logprobs(
    model, query_response: Tensor, attention_mask: Tensor, responses: Tensor, temperature: float
) -> Tensor:
    """Per-token log-probs ``[B, R]`` of ``responses`` (the last tokens of ``query_response``) under a
    causal LM, temperature-scaled as sampled; only the response positions are projected onto the vocabulary."""
    R = responses.shape[1]
    logits = model(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
        logits_to_keep=R + 1,
    ).logits
    return token_logprobs(logits, responses, temperature, entropy=False)[0]
