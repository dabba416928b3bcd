"""The decoding loop that drops finished rows (``pipeline/decoding.py``) against ``model.generate``."""

from __future__ import annotations

import pytest
import torch

from pipeline import decoding
from pipeline.sampling import GREEDY, InverseCDFSampler, sampling_kwargs
from pipeline.sequences import response_logprobs, response_mask
from tests.conftest import make_causal_lm, make_tokenizer

PROMPTS = ["Explain why volcanoes erupt.", "Plants", "Name three rivers in Europe, please", "Hi there"]


@pytest.fixture
def tiny_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(tmp_path / "tok")
    make_causal_lm(tmp_path / "lm", tok, initializer_range=0.3)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval(), tok


def encode(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")


def an_eos_that_stops_rows_early(model, tok, enc, **mode) -> int:
    """A token some row draws early on but not every row: as the EOS, rows finish at different steps."""
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             **mode)  # fmt: skip
    new = out[:, enc["input_ids"].shape[1] :]
    for row in range(len(new)):
        for t in range(1, 6):
            candidate = int(new[row, t])
            hits = (new == candidate).any(1)
            if candidate != tok.pad_token_id and 0 < int(hits.sum()) < len(new):
                return candidate
    pytest.skip("the tiny model repeats one token in every row")


def test_greedy_equals_generate_when_rows_finish_at_different_steps(tiny_lm):
    model, tok = tiny_lm
    enc = encode(tok)
    eos = an_eos_that_stops_rows_early(model, tok, enc, **GREEDY)
    kw = dict(max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos, **GREEDY)
    with torch.no_grad():
        want = model.generate(**enc, **kw)
    got = decoding.generate(model, **enc, **kw)
    mask, has_eos = response_mask(want[:, enc["input_ids"].shape[1] :], eos)
    assert has_eos.any() and not mask.all()  # some rows did stop early: the rows left the batch
    assert torch.equal(got, want)


def test_all_rows_finished_stops_the_loop(tiny_lm):
    """When every row has drawn its EOS the output ends there, as ``generate``'s does."""
    model, tok = tiny_lm
    enc = encode(tok)
    with torch.no_grad():
        first = model.generate(**enc, max_new_tokens=1, pad_token_id=tok.pad_token_id, **GREEDY)[:, -1]
    got = decoding.generate(model, **enc, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                            eos_token_id=first.tolist(), **GREEDY)  # fmt: skip
    assert torch.equal(got, torch.cat([enc["input_ids"], first.unsqueeze(1)], 1))  # every row ended at token 1


def test_sampling_draws_what_generate_draws_until_a_row_finishes(tiny_lm):
    """The same seed draws the same tokens as ``generate`` while every row runs (the same uniform numbers);
    after the first row finishes the streams part, since finished rows no longer draw."""
    model, tok = tiny_lm
    enc = encode(tok)
    P = enc["input_ids"].shape[1]
    eos = an_eos_that_stops_rows_early(model, tok, enc, **sampling_kwargs(0.7))
    kw = dict(max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    torch.manual_seed(11)
    got = decoding.generate(model, **enc, **kw, **sampling_kwargs(0.7))
    torch.manual_seed(11)
    with torch.no_grad():
        want = model.generate(**enc, **kw, **sampling_kwargs(0.7))
    mask, has_eos = response_mask(got[:, P:], eos)
    steps = int(mask.sum(1).min())  # every row was still running before this step
    assert torch.equal(got[:, P : P + steps], want[:, P : P + steps])
    # Padding after each row's EOS, nothing else.
    assert (got[:, P:][~mask] == tok.pad_token_id).all()


def test_recorded_logprobs_are_a_forward_pass_s_and_zero_for_finished_rows(tiny_lm):
    model, tok = tiny_lm
    enc = encode(tok)
    P = enc["input_ids"].shape[1]
    temperature = 0.7
    eos = an_eos_that_stops_rows_early(model, tok, enc, **sampling_kwargs(temperature))
    sampler = InverseCDFSampler(record_logprobs=True)
    torch.manual_seed(5)
    out = decoding.generate(
        model, **enc, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos,
        **sampling_kwargs(temperature, sampler=sampler),
    )  # fmt: skip
    resp = out[:, P:]
    mask, _ = response_mask(resp, eos)
    got = sampler.take_logprobs()
    with torch.no_grad():
        want = response_logprobs(model, out, torch.cat([enc["attention_mask"], mask.long()], 1), resp, temperature)
    assert got.shape == resp.shape and not mask.all()
    torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, want, 0.0), atol=1e-4, rtol=1e-4)
    assert (got[~mask] == 0).all()  # rows that had left the batch record nothing


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_a_generation_config_s_repetition_penalty_applies_as_in_generate(tiny_lm, mode):
    """Many chat models ship a repetition penalty in their generation config; ``generate`` applies it (prompt
    padding excluded) before the caller's processors, and so does the loop, on the rows still running."""
    model, tok = tiny_lm
    enc = encode(tok)
    P = enc["input_ids"].shape[1]
    flags = GREEDY if mode == "greedy" else sampling_kwargs(0.7)
    model.generation_config.repetition_penalty = 5.0
    assert decoding.can_compact(model) is None
    eos = an_eos_that_stops_rows_early(model, tok, enc, **flags)  # chosen on the penalised model's own tokens
    kw = dict(max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos, **flags)
    torch.manual_seed(3)  # the seed the EOS was chosen with
    got = decoding.generate(model, **enc, **kw)
    torch.manual_seed(3)
    with torch.no_grad():
        want = model.generate(**enc, **kw)
    model.generation_config.repetition_penalty = 1.0
    torch.manual_seed(3)
    plain = decoding.generate(model, **enc, **kw)
    assert not torch.equal(got, plain)  # the penalty changes the tokens, so the comparison below means something
    mask, has_eos = response_mask(got[:, P:], eos)
    assert has_eos.any() and not mask.all()  # rows left the batch, so set_rows picked the running rows' padding
    steps = int(mask.sum(1).min()) if mode == "sampled" else got.shape[1] - P  # sampled: until a row finishes
    assert torch.equal(got[:, P : P + steps], want[:, P : P + steps])


def test_the_repetition_penalty_follows_the_running_rows():
    """After rows leave, each running row keeps its own prompt padding length (what the penalty ignores)."""
    proc = decoding.RowsRepetitionPenalty(1.3, torch.tensor([0, 2, 5, 1]))
    proc.set_rows(torch.tensor([1, 3]), 4)
    assert proc.prompt_ignore_length.tolist() == [2, 1]


def test_generation_configs_with_other_processors_go_to_generate(tiny_lm):
    model, _ = tiny_lm
    assert decoding.can_compact(model) is None
    model.generation_config.no_repeat_ngram_size = 2
    assert "no_repeat_ngram_size" in decoding.can_compact(model)
    assert decoding.can_compact(model, no_repeat_ngram_size=0) is None
    model.generation_config.no_repeat_ngram_size = 0
    model.generation_config.remove_invalid_values = True
    assert "remove_invalid_values" in decoding.can_compact(model)


def test_models_whose_cache_rows_cannot_be_dropped_go_to_generate(tiny_lm, monkeypatch):
    """Recurrent or linear-attention state (hybrid models) is not cut by ``batch_select_indices``; models
    that do not take a ``DynamicCache`` at all go to ``generate`` too."""
    model, _ = tiny_lm
    n = model.config.num_hidden_layers
    monkeypatch.setattr(
        model.config, "layer_types", ["linear_attention"] + ["full_attention"] * (n - 1), raising=False
    )
    assert "LinearAttentionLayer" in decoding.can_compact(model)
    monkeypatch.setattr(model.config, "layer_types", ["hybrid"] + ["full_attention"] * (n - 1), raising=False)
    assert "LinearAttentionAndFullAttentionLayer" in decoding.can_compact(model)
    monkeypatch.setattr(model.config, "layer_types", ["full_attention"] * n, raising=False)
    assert decoding.can_compact(model) is None
    monkeypatch.setattr(type(model), "_supports_default_dynamic_cache", classmethod(lambda cls: False))
    assert "DynamicCache" in decoding.can_compact(model)


def test_unknown_arguments_are_refused(tiny_lm):
    model, tok = tiny_lm
    enc = encode(tok)
    with pytest.raises(TypeError, match="num_beams"):
        decoding.generate(model, **enc, max_new_tokens=2, pad_token_id=0, eos_token_id=1, num_beams=2)
    with pytest.raises(TypeError, match="do_sample"):
        decoding.generate(model, **enc, max_new_tokens=2, pad_token_id=0, eos_token_id=1, do_sample=True)


def test_generate_s_fallbacks_for_pad_eos_and_zero_tokens(tiny_lm):
    """As in ``generate``: no pad id pads with the first EOS id, an EOS tensor works, zero new tokens is the prompt."""
    model, tok = tiny_lm
    enc = encode(tok)
    eos = an_eos_that_stops_rows_early(model, tok, enc, **GREEDY)
    got = decoding.generate(model, **enc, max_new_tokens=12, pad_token_id=None, eos_token_id=torch.tensor([eos]))
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=12, pad_token_id=eos, eos_token_id=eos, **GREEDY)
    assert torch.equal(got, want)
    same = decoding.generate(model, **enc, max_new_tokens=0, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(same, enc["input_ids"])


SHARED = "You are a careful assistant. Answer briefly and plainly. "
OWN = ["Explain why volcanoes erupt, in two sentences.", "Plants", "Hi", "Name three rivers in Europe, please"]
SHARED_PROMPTS = [SHARED + p for p in OWN]


def test_prefill_shares_the_prefix_and_chunks_rows_yet_matches_one_forward(tiny_lm):
    """The shared prefix runs once and the rows run in length-sorted chunks; the last-position logits and every
    unmasked key and value equal those of one forward over the left-padded batch."""
    from transformers import DynamicCache

    from pipeline.sequences import position_ids_from

    model, tok = tiny_lm
    enc = tok(SHARED_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    shared = decoding._shared_prefix_length(ids, mask.sum(1))
    assert shared >= len(tok(SHARED.strip()).input_ids) - 1  # the common words, give or take a merged token
    assert decoding.can_share_prefill(model, mask) is None
    calls = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)  # fmt: skip
    logits, cache = decoding.prefill(model, ids, mask, chunk_tokens=2 * (mask.sum(1).max() - shared))
    hook.remove()
    assert calls[0] == (1, shared) and len(calls) == 3  # the prefix once, then two chunks of the four rows
    assert sum(b * w for b, w in calls[1:]) < ids.numel()  # fewer token rows than the one padded forward
    want_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask), use_cache=True,
                     past_key_values=want_cache).logits[:, -1:]  # fmt: skip
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    real = mask.bool()[:, None, :, None]
    for got_layer, want_layer in zip(cache.layers, want_cache.layers):
        assert got_layer.keys.shape == want_layer.keys.shape
        for got_t, want_t in ((got_layer.keys, want_layer.keys), (got_layer.values, want_layer.values)):
            torch.testing.assert_close(torch.where(real, got_t, 0.0), torch.where(real, want_t, 0.0), atol=1e-5,
                                       rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("chunk_tokens", [1, 4096])
def test_greedy_equals_generate_with_a_shared_prefix(tiny_lm, chunk_tokens, monkeypatch):
    """Greedy tokens as ``generate``'s, with the prefix shared and rows one per chunk or all in one."""
    model, tok = tiny_lm
    monkeypatch.setattr(decoding, "PREFILL_CHUNK_TOKENS", chunk_tokens)
    enc = tok(SHARED_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    eos = an_eos_that_stops_rows_early(model, tok, enc, **GREEDY)
    kw = dict(max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos, **GREEDY)
    with torch.no_grad():
        want = model.generate(**enc, **kw)
    assert torch.equal(decoding.generate(model, **enc, **kw), want)


def test_prefill_is_one_forward_where_it_cannot_split_the_batch(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    right = tok(SHARED_PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    assert "left-padded" in decoding.can_share_prefill(model, right["attention_mask"])
    left = tok(SHARED_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    n = model.config.num_hidden_layers
    monkeypatch.setattr(model.config, "layer_types", ["sliding_attention"] * n, raising=False)
    monkeypatch.setattr(model.config, "sliding_window", 4, raising=False)
    assert "DynamicSlidingWindowLayer" in decoding.can_share_prefill(model, left["attention_mask"])
    monkeypatch.setattr(model.config, "layer_types", ["full_attention"] * n, raising=False)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert "flash_attention_2" in decoding.can_share_prefill(model, left["attention_mask"])
    calls = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)  # fmt: skip
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa", raising=False)
    decoding.prefill(model, right["input_ids"], right["attention_mask"])
    hook.remove()
    assert calls == [right["input_ids"].shape]


def _prompts_and_responses(tok, lengths=(5, 1, 3, 0)):
    """Left-padded shared-prefix prompts, then right-padded responses of ``lengths`` tokens (R = 6)."""
    enc = tok(SHARED_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    R = 6
    torch.manual_seed(0)
    resp = torch.randint(5, len(tok) - 1, (len(lengths), R))
    rmask = torch.arange(R).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    resp = resp.masked_fill(~rmask, tok.pad_token_id)
    ids = torch.cat([enc["input_ids"], resp], 1)
    mask = torch.cat([enc["attention_mask"], rmask.long()], 1)
    return ids, mask, enc["input_ids"].shape[1], rmask


@pytest.mark.parametrize("chunk_tokens", [1, 40, 10_000])
def test_scoring_forward_equals_one_padded_forward(tiny_lm, chunk_tokens):
    """Log-probs and last-position outputs through ``scoring_forward`` (shared prefix once, length-sorted chunks
    cut to their longest prompt and response) equal one forward over the padded batch where the mask is 1."""
    from pipeline.sequences import position_ids_from

    model, tok = tiny_lm
    ids, mask, P, rmask = _prompts_and_responses(tok)
    calls = []

    def run(i, am, pos, kv, k):
        calls.append(tuple(i.shape))
        return model(input_ids=i, attention_mask=am, position_ids=pos, use_cache=bool(kv), logits_to_keep=k,
                     **kv).logits  # fmt: skip

    keep = ids.shape[1] - P + 1
    with torch.no_grad():
        got = decoding.scoring_forward(run, model, ids, mask, P, keep, chunk_tokens=chunk_tokens)
        want = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                     logits_to_keep=keep).logits  # fmt: skip
    assert calls[0][0] == 1 and len(calls) >= 2  # the shared prefix ran once, as one row
    assert sum(b * w for b, w in calls[1:]) < ids.numel()
    used = torch.cat([torch.ones(len(ids), 1, dtype=torch.bool), rmask], 1)  # the last prompt token, the response
    torch.testing.assert_close(got[used], want[used], atol=1e-5, rtol=1e-5)
    if chunk_tokens == 1:  # every row a chunk of its own: the positions after its response are zeros
        assert (got[~used] == 0).all()
    with torch.no_grad():  # a window of the last position only: masked padding in the shorter rows
        last = decoding.scoring_forward(run, model, ids, mask, P, 1, chunk_tokens=chunk_tokens)
    full = rmask.all(1)
    torch.testing.assert_close(last[full], want[full][:, -1:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the input of the second layer, captured, laid out as the padded forward's
        layer = model.model.layers[1]
        got2, hidden = decoding.scoring_forward(
            run, model, ids, mask, P, keep, chunk_tokens=chunk_tokens, capture=layer
        )
        want_hidden = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                            output_hidden_states=True).hidden_states[1]  # fmt: skip
    assert torch.equal(got2, got) and hidden.shape == want_hidden.shape
    real = mask.bool()
    torch.testing.assert_close(hidden[real], want_hidden[real], atol=1e-5, rtol=1e-5)
    assert not hidden[~real].any()
    assert not layer._forward_pre_hooks  # the capture's hook is gone


def test_scoring_forward_is_one_forward_where_it_cannot_split(tiny_lm):
    model, tok = tiny_lm
    ids, mask, P, _ = _prompts_and_responses(tok)
    calls = []

    def run(i, am, pos, kv, k):
        calls.append(tuple(i.shape))
        return model(input_ids=i, attention_mask=am, position_ids=pos, logits_to_keep=k).logits

    with torch.no_grad():
        decoding.scoring_forward(run, model, ids, mask, P, ids.shape[1] - P + 1, split=False)
        decoding.scoring_forward(
            run, model, ids, mask, P, ids.shape[1], chunk_tokens=1
        )  # the window reaches the prompt
        holes = mask.clone()
        holes[0, P] = 0  # a response mask that is not right-padded
        decoding.scoring_forward(run, model, ids, holes, P, 3)
    assert calls == [tuple(ids.shape)] * 3


def _pairs(tmp_path, **lora):
    """A tiny reward model inside PEFT (LoRA on every linear layer, the score head trained in full) and a batch
    laid out as TRL's reward collator lays it out: the chosen replies' rows, then the rejected ones, right-padded,
    after a system turn and one prompt per pair."""
    from peft import LoraConfig, get_peft_model

    from tests.conftest import make_seq_cls

    tok = make_tokenizer(tmp_path / "tok")
    model = make_seq_cls(tmp_path / "rm", tok, initializer_range=0.3)
    model.config.pad_token_id = tok.pad_token_id
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"],
                        init_lora_weights=False, **lora)  # fmt: skip
    net = get_peft_model(model, config).train()
    chosen = ["lava rises", "sun and water turn to sugar today", "Rhine", "hello friend"]
    rejected = ["rocks", "sugar", "the Rhine, the Danube and the Seine", "hello"]
    texts = [tok.apply_chat_template([{"role": "system", "content": "You are kind."}, {"role": "user", "content": p},
                                      {"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(PROMPTS * 2, chosen + rejected)]  # fmt: skip
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="right")
    return net, enc["input_ids"], enc["attention_mask"], torch.arange(4).repeat(2)


@pytest.mark.parametrize("budget", [1, 150, 10_000])
def test_packed_last_outputs_equal_one_forward_in_value_and_gradient(tmp_path, budget):
    """A reward batch's scores packed as prefix trees (the system turn once, each pair's prompt once, then the
    rows' own tokens, no padding) equal one padded forward's, and so do the gradients of a loss on them (a
    prefix's backward runs once for all its rows); with a small budget, as several packs."""
    net, ids, mask, groups = _pairs(tmp_path)
    lengths = mask.sum(1)
    c, shared = decoding.group_prefix_lengths(ids, lengths, groups)
    assert 0 < c < int(shared.min()) and (shared[groups] < lengths).all()
    assert decoding.can_pack_prefixes(net.get_base_model(), mask) is None
    packs = decoding.pack_groups(ids, lengths, groups, budget)
    assert sorted(r for p in packs for r in p.rows) == list(range(8))
    assert len(packs) == {1: 4, 150: 2, 10_000: 1}[budget]  # whole pairs, at least one per pack
    tokens = sum(len(p.ids) for p in packs)
    assert tokens == len(packs) * c + int((shared - c).sum() + (lengths - shared[groups]).sum()) < 0.6 * lengths.sum()
    run = decoding.score_head_run(net)

    def grads(scores):
        net.zero_grad()
        (scores * torch.linspace(-1, 1, len(scores))).sum().backward()
        return [p.grad.clone() for p in net.parameters() if p.requires_grad]

    got = decoding.packed_last_outputs(run, run.model, ids, mask, groups, budget=budget)
    got_grads = grads(got)
    want = net(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    want_grads = grads(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [150, 10_000])
def test_packed_attention_runs_one_group_at_a_time_and_equals_the_dense_mask(tmp_path, monkeypatch, budget):
    """Under SDPA a pack's attention runs per group (``segmented_sdpa``): the shared tokens, then each pair's
    tokens over the shared ones and their own, with SDPA's boolean mask. Scores and gradients equal the pack's
    one dense-masked SDPA call; the model's attention implementation is SDPA again afterwards; with activation
    checkpointing it stays dense. With a small budget, over two packs."""
    import transformers.integrations.sdpa_attention as sdpa

    net, ids, mask, groups = _pairs(tmp_path)
    run = decoding.score_head_run(net)
    inner = run.model
    assert inner.config._attn_implementation == "sdpa" and decoding.can_segment(inner)
    packs = decoding.pack_groups(ids, mask.sum(1), groups, budget)
    calls = []  # (query length, key length, mask dtype) of every SDPA call
    plain = sdpa.sdpa_attention_forward

    def recorded(module, query, key, value, attention_mask, **kw):
        calls.append((query.shape[2], key.shape[2], attention_mask.dtype))
        return plain(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", recorded)  # what segmented_sdpa calls per group
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", recorded)  # what the dense forward calls

    def scores_and_grads(segment: bool):
        monkeypatch.setattr(decoding, "can_segment", lambda model: segment)
        calls.clear()
        net.zero_grad()
        got = decoding.packed_last_outputs(run, inner, ids, mask, groups, budget=budget)
        (got * torch.linspace(-1, 1, len(got))).sum().backward()
        return got, [p.grad.clone() for p in net.parameters() if p.requires_grad], list(calls)

    dense, dense_grads, dense_calls = scores_and_grads(False)
    got, got_grads, got_calls = scores_and_grads(True)
    assert inner.config._attn_implementation == "sdpa"
    layers = inner.config.num_hidden_layers
    assert [q for q, _, _ in dense_calls] == [len(p.ids) for p in packs for _ in range(layers)]
    want = []  # per pack and layer: the shared tokens over themselves, then each group over shared + its own
    for p in packs:
        c, spans = p.spans[0], p.spans
        assert spans[-1] == len(p.ids) and len(spans) == len(p.rows) // 2 + 1
        per_layer = [(c, c)] + [(e - s, c + e - s) for s, e in zip(spans[:-1], spans[1:])]
        want += per_layer * layers
    assert [(q, k) for q, k, _ in got_calls] == want
    assert {d for _, _, d in got_calls} == {torch.bool}
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, dense_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    net.get_base_model().gradient_checkpointing_enable()
    assert not decoding.can_segment(inner)


def test_a_packed_token_sees_its_own_row_before_it():
    """The prefix tree's mask: a row's own token sees the shared prefix, its group's prompt and its own earlier
    tokens; nothing of another group or of its pair's other reply."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 5, 6], [1, 7, 8, 0, 0], [1, 7, 9, 0, 0]])
    lengths = torch.tensor([4, 5, 3, 3])
    (pack,) = decoding.pack_groups(ids, lengths, torch.tensor([0, 0, 1, 1]), 100)
    # [1] shared, [2 3] pair 0, [4] row 0, [5 6] row 1, [7] pair 1, [8] row 2, [9] row 3
    assert pack.ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9] and pack.positions.tolist() == [0, 1, 2, 3, 3, 4, 1, 2, 2]
    assert pack.last.tolist() == [3, 5, 7, 8] and pack.rows == [0, 1, 2, 3]
    seen = {int(pack.ids[i]): pack.ids[pack.visible[i]].tolist() for i in range(len(pack.ids))}
    assert seen == {1: [1], 2: [1, 2], 3: [1, 2, 3], 4: [1, 2, 3, 4], 5: [1, 2, 3, 5], 6: [1, 2, 3, 5, 6], 7: [1, 7],
                    8: [1, 7, 8], 9: [1, 7, 9]}  # fmt: skip


def test_group_prefixes_leave_every_row_a_token_of_its_own():
    """Identical rows share all but their last token; rows that differ from the start share nothing."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [5, 6, 9, 1, 2]])
    lengths = torch.tensor([4, 4, 3, 5])
    c, shared = decoding.group_prefix_lengths(ids, lengths, torch.tensor([0, 0, 1, 1]))
    assert c == 2 and shared.tolist() == [3, 2]
    c, shared = decoding.group_prefix_lengths(torch.tensor([[1, 2], [3, 4]]), torch.tensor([2, 2]),
                                              torch.tensor([0, 0]))  # fmt: skip
    assert c == 0 and shared.tolist() == [0]


def test_packing_is_refused_with_dropout_or_left_padding(tmp_path):
    net, ids, mask, _ = _pairs(tmp_path, lora_dropout=0.1)
    inner = net.get_base_model()
    assert decoding.can_pack_prefixes(inner, mask) == "dropout is active"
    net.eval()
    assert decoding.can_pack_prefixes(inner, mask) is None  # no masks are drawn outside training
    assert decoding.can_pack_prefixes(inner, mask.flip(1)) == "its rows are not right-padded"


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_scores_under_each_attention_and_bf16_autocast(tmp_path, attention):
    """The packed mask is additive for eager attention and boolean for SDPA; both give one forward's scores, in
    fp32 and under bf16 autocast (where a CPU with AVX512-BF16 trains the reward model)."""
    net, ids, mask, groups = _pairs(tmp_path)
    inner = net.get_base_model()
    inner.set_attn_implementation(attention)
    assert inner.config._attn_implementation == attention
    run = decoding.score_head_run(net)
    with torch.no_grad():
        for autocast, tol in ((False, 1e-5), (True, 0.05)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got = decoding.packed_last_outputs(run, inner, ids, mask, groups, budget=1024)
                want = net(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
