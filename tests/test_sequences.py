"""Tests of ``pipeline/sequences.py``: the response mask and the response logits shared by PPO and eval."""

from __future__ import annotations

import torch


def test_response_logits_with_logits_to_keep_match_full_logits(tiny_artifacts):
    """Computing logits only for the response positions selects exactly what slicing the full
    logits would, and position t predicts token t+1 (checked against generate's own scores)."""
    from transformers import AutoModelForCausalLM

    from pipeline.sequences import position_ids_from, response_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_artifacts / "sft" / "model").eval()
    prompt = torch.tensor([[0, 0, 5, 9, 14], [3, 7, 5, 9, 14]])  # left-padded (pad id 0)
    am = (prompt != 0).long()
    R = 4
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=am,
            max_new_tokens=R,
            min_new_tokens=R,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        qr = out.sequences
        full_am = torch.cat([am, torch.ones(2, R, dtype=torch.long)], 1)
        kw = dict(input_ids=qr, attention_mask=full_am, position_ids=position_ids_from(full_am), use_cache=False)
        full = response_logits(model(**kw).logits, R, 0.5)
        kept = response_logits(model(**kw, logits_to_keep=R + 1).logits, R, 0.5)
    assert full.shape == kept.shape == (2, R, model.config.vocab_size)
    torch.testing.assert_close(kept, full)
    scores = torch.stack(out.scores, 1)
    shown = torch.isfinite(scores)  # min_new_tokens sets EOS to -inf in generate's scores
    assert shown.float().mean() > 0.99
    torch.testing.assert_close((full * 0.5)[shown], scores[shown], atol=1e-4, rtol=1e-4)


def test_response_mask_pad_inside_response_does_not_end_it():
    from pipeline.sequences import response_mask

    eos = 2  # pad id is 0
    responses = torch.tensor(
        [
            [5, 0, 7, 2, 0, 0],  # pad id inside the response, then EOS: valid up to and including EOS
            [0, 0, 9, 9, 9, 9],  # starts with pad ids, no EOS: the whole row is valid (truncated)
            [2, 0, 0, 0, 0, 0],  # EOS first: only the EOS is valid
            [4, 4, 4, 4, 4, 2],  # EOS at the cap
            [4, 2, 4, 2, 0, 0],  # two EOS: the first one ends it
        ]
    )
    mask, has_eos = response_mask(responses, eos)
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert has_eos.tolist() == [True, False, True, True, True]
