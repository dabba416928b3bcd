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


SYSTEM = [{"role": "system", "content": "You are a careful assistant. Answer briefly and plainly."}]


def _model_forward_scores(model, tok, prompts, responses):
    """Each text alone through the model's own forward (its pooling at the last non-pad token)."""
    import torch

    from reward_models.learned import chat_texts

    out = []
    with torch.no_grad():
        for text in chat_texts(tok, prompts, responses):
            enc = tok([text], return_tensors="pt", add_special_tokens=False)
            out.append(model(**enc).logits[0, 0].float())
    return torch.stack(out)


def test_decoder_reward_models_score_through_the_shared_prefix_as_their_own_forward(tmp_path, tiny_tok, monkeypatch):
    """A decoder reward model's batches run through ``scoring_forward`` (the system turn once, rows in chunks),
    and give the scores of the model's own forward, in the input order."""
    import torch

    from pipeline import decoding
    from reward_models import learned
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok, initializer_range=0.3).eval()
    prompts = [SYSTEM + [{"role": "user", "content": f"Explain volcanoes, take {i}."}] for i in range(7)]
    responses = ["lava " * n + "flows." for n in (9, 1, 5, 12, 3, 0, 7)]
    calls = []
    real = decoding.scoring_forward
    monkeypatch.setattr(decoding, "scoring_forward", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    monkeypatch.setattr(decoding, "SCORING_CHUNK_TOKENS", 60)  # several chunks per batch
    assert decoding.score_head_run(model) is not None
    got = learned.reward_scores(model, tiny_tok, prompts, responses, batch_size=4)
    assert len(calls) == 2  # both batches went through scoring_forward
    want = _model_forward_scores(model, tiny_tok, prompts, responses)
    assert want.unique().numel() == len(responses)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_texts_ending_in_the_pad_id_and_encoder_models_keep_the_model_s_forward(tmp_path, tiny_tok, monkeypatch):
    """Where pad = EOS a text may end in the pad id, which the model's pooling skips: that batch goes through the
    model's own forward. An encoder reward model (no ``score`` head over a causal backbone) always does."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline import decoding
    from reward_models import learned
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok, initializer_range=0.3).eval()
    model.config.pad_token_id = tiny_tok.eos_token_id  # pad = EOS: the chat texts end "<|im_end|>\n"
    prompts = [SYSTEM + [{"role": "user", "content": "Explain volcanoes."}]] * 2
    responses = ["lava flows.", "magma rises"]
    texts = learned.chat_texts(tiny_tok, prompts, responses)
    tok = tiny_tok
    monkeypatch.setattr(learned, "chat_texts", lambda *a: [t.rstrip("\n") for t in texts])  # end in the EOS
    calls = []
    monkeypatch.setattr(decoding, "scoring_forward", lambda *a, **k: calls.append(1))
    got = learned.reward_scores(model, tok, prompts, responses, batch_size=2)
    assert not calls
    with torch.no_grad():
        enc = tok([t.rstrip("\n") for t in texts], return_tensors="pt", padding=True, padding_side="right",
                  add_special_tokens=False)  # fmt: skip
        torch.testing.assert_close(got, model(**enc).logits[:, 0].float())

    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1)  # fmt: skip
    bert = BertForSequenceClassification(config)
    assert decoding.score_head_run(bert) is None


def test_pair_scores_are_each_reply_s_own_score(tmp_path, tiny_tok, monkeypatch):
    """Both replies of preference pairs scored packed (each pair's prompt once) get the scores the model's own
    forward gives each text alone, in input order, across length-sorted batches and several packs; a batch the
    packing cannot take goes through ``reward_scores``."""
    import torch

    from pipeline import decoding
    from reward_models import learned
    from tests.conftest import make_seq_cls

    model = make_seq_cls(tmp_path / "rm", tiny_tok, initializer_range=0.2).eval()
    model.config.pad_token_id = tiny_tok.pad_token_id
    prompts = [SYSTEM + [{"role": "user", "content": f"Explain volcanoes, take {i}." + " Why?" * i}] for i in range(7)]
    chosen = ["lava " * n + "flows." for n in (9, 1, 5, 12, 3, 0, 7)]
    rejected = ["rock " * n for n in (2, 8, 1, 1, 6, 4, 3)]
    want_c = _model_forward_scores(model, tiny_tok, prompts, chosen)
    want_r = _model_forward_scores(model, tiny_tok, prompts, rejected)
    monkeypatch.setattr(decoding, "PACK_TOKENS", 150)  # a few pairs per packed sequence
    packed = []
    original = decoding.packed_last_outputs
    monkeypatch.setattr(decoding, "packed_last_outputs", lambda *a, **k: packed.append(1) or original(*a, **k))
    got_c, got_r = learned.reward_pair_scores(model, tiny_tok, prompts, chosen, rejected, batch_size=3)
    assert len(packed) == 3  # every batch of pairs was packed
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(decoding, "can_pack_prefixes", lambda *_: "eager or sdpa needed")
    got_c, got_r = learned.reward_pair_scores(model, tiny_tok, prompts, chosen, rejected, batch_size=3)
    assert len(packed) == 3
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-4)
