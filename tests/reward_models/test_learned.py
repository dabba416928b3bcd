"""Tests of ``reward_models/learned.py``: scoring (prompt, response) pairs with a learned reward model."""

from __future__ import annotations


def test_reward_scores_keep_input_order_across_length_sorted_batches(tmp_path, tiny_tok):
    """Scoring sorts by length to pad less; each score must still belong to its own input."""
    import torch

    from reward_models.learned import reward_scores
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok).eval()
    prompts = [[{"role": "user", "content": f"Explain volcanoes, take {i}."}] for i in range(7)]
    responses = ["lava " * n + "flows." for n in (9, 1, 5, 12, 3, 0, 7)]
    one_by_one = torch.cat(
        [reward_scores(model, tiny_tok, [p], [r], batch_size=1) for p, r in zip(prompts, responses)]
    )
    batched = reward_scores(model, tiny_tok, prompts, responses, batch_size=3)
    assert one_by_one.unique().numel() == len(responses)  # distinct scores, so a permutation would show
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert reward_scores(model, tiny_tok, [], [], batch_size=3).numel() == 0
