"""Inverse-CDF sampling (``pipeline/sampling.py``): the draw follows the distribution, never picks a
zero-probability token, and through ``generate`` samples softmax(logits / T) like ``do_sample=True``."""

from __future__ import annotations

import pytest
import torch

from pipeline.sampling import inverse_cdf_sample, sampling_kwargs
from tests.conftest import make_causal_lm, make_tokenizer


def test_frequencies_follow_the_probabilities():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = inverse_cdf_sample(p.repeat(40000, 1))
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_unnormalised_rows_and_a_uniform_at_the_top(monkeypatch):
    """Rows summing to slightly more or less than 1 are fine; a uniform that rounds to the row total
    does not fall onto the zero-probability tail."""
    probs = torch.tensor([[0.2, 0.7000001, 0.1, 0.0, 0.0], [0.0, 0.0, 0.3, 0.69999, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[:2], dtype=k.get("dtype")))
    out = inverse_cdf_sample(probs)
    assert (probs.gather(1, out.unsqueeze(1)) > 0).all()


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        sampling_kwargs(0.0)


@pytest.fixture
def tiny_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(tmp_path / "tok")
    make_causal_lm(tmp_path / "lm", tok, initializer_range=0.3)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval(), tok


def test_generate_samples_softmax_of_scaled_logits(tiny_lm):
    """The first generated token of many copies of one prompt is distributed as softmax(logits / T)."""
    model, tok = tiny_lm
    n, temperature = 6000, 0.7
    enc = tok(["Explain why volcanoes erupt."], return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(model(**enc).logits[0, -1].float() / temperature, -1)
        torch.manual_seed(1)
        out = model.generate(
            input_ids=enc["input_ids"].repeat(n, 1),
            attention_mask=enc["attention_mask"].repeat(n, 1),
            max_new_tokens=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **sampling_kwargs(temperature),
        )
    freq = torch.bincount(out[:, -1], minlength=want.numel()).float() / n
    assert want.max() < 0.9  # the test distribution is not degenerate
    assert 0.5 * (freq - want).abs().sum() < 0.05  # total variation distance


def test_generate_top_k_one_is_greedy_and_seeds_reproduce(tiny_lm):
    model, tok = tiny_lm
    enc = tok(
        ["Explain why volcanoes erupt.", "Plants turn sunlight"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    common = dict(**enc, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        greedy = model.generate(**common, do_sample=False)
        assert torch.equal(model.generate(**common, **sampling_kwargs(1.0, top_k=1)), greedy)
        runs = []
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            runs.append(model.generate(**common, **sampling_kwargs(1.0)))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_recorded_logprobs_equal_a_forward_pass(tiny_lm):
    """The sampler's recorded log-probs are those of the sampled tokens under softmax(logits / T), as a
    fresh forward pass over prompt + response computes them (left padding, rows ending early)."""
    from pipeline.sampling import InverseCDFSampler
    from pipeline.sequences import response_logprobs, response_mask

    model, tok = tiny_lm
    temperature = 0.7
    enc = tok(
        ["Explain why volcanoes erupt.", "Plants", "Name three rivers in Europe, please"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    sampler = InverseCDFSampler(record_logprobs=True)

    def sample(eos_id):
        torch.manual_seed(3)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=12,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos_id,
                **sampling_kwargs(temperature, sampler=sampler),
            )
        return out, out[:, enc["input_ids"].shape[1] :]

    _, first = sample(tok.eos_token_id)
    sampler.take_logprobs()
    eos_id = int(first[0, 4])  # a token the first row draws: with it as EOS, that row stops early
    out, resp = sample(eos_id)
    mask, _ = response_mask(resp, eos_id)
    got = sampler.take_logprobs()
    with torch.no_grad():
        want = response_logprobs(model, out, torch.cat([enc["attention_mask"], mask.long()], 1), resp, temperature)
    assert got.shape == resp.shape and not mask.all()
    torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, want, 0.0), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="no log-probs recorded"):
        sampler.take_logprobs()  # cleared by the first call


def test_recording_does_not_change_the_draw(tiny_lm):
    from pipeline.sampling import InverseCDFSampler

    model, tok = tiny_lm
    enc = tok(["Explain why volcanoes erupt."], return_tensors="pt")
    runs = []
    for record in (False, True):
        torch.manual_seed(9)
        with torch.no_grad():
            runs.append(
                model.generate(
                    **enc,
                    max_new_tokens=8,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    **sampling_kwargs(1.0, sampler=InverseCDFSampler(record_logprobs=record)),
                )
            )
    assert torch.equal(*runs)


def test_recorded_entropy_is_that_of_the_distribution_drawn_from():
    """``record_entropy``: each step's entropy of softmax(scores), filtered (-inf) tokens adding 0, one value per
    row of the whole batch, 0 for rows that left it (``set_rows``); the draw itself is unchanged."""
    from pipeline.ppo.core import entropy_from_logits
    from pipeline.sampling import InverseCDFSampler

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores[0, :10] = float("-inf")  # as top-k / top-p leave them
    want = entropy_from_logits(scores.unsqueeze(1)).squeeze(1)
    proc, plain = InverseCDFSampler(record_logprobs=True, record_entropy=True), InverseCDFSampler()
    torch.manual_seed(4)
    first = proc(None, scores.clone())
    torch.manual_seed(4)
    assert torch.equal(first, plain(None, scores.clone()))
    proc.set_rows(torch.tensor([0, 2]), 3)
    proc(None, scores[[0, 2]].clone())
    got = proc.take_entropy()
    assert got.shape == (3, 2) and proc.take_logprobs().shape == (3, 2)
    torch.testing.assert_close(got[:, 0], want)
    torch.testing.assert_close(got[:, 1], torch.stack([want[0], torch.tensor(0.0), want[2]]))
    with pytest.raises(RuntimeError, match="no entropy recorded"):
        proc.take_entropy()
