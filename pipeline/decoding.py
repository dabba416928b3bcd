"""A decoding loop that drops finished rows from the batch.

``transformers``' ``generate`` keeps every row of a batch in every decoding step until the last row has
hit EOS (or the token limit): a row that ended at token 10 of 64 still costs a forward row, a slice of
the KV cache and a vocabulary projection at each of the remaining 54 steps. With a policy whose responses
average 34-42 of 64 tokens, that is a third or more of every sampled batch spent on padding. Its
continuous batching (``generate_batch``) does drop finished rows, but its paged cache and scheduler ran
about 5x slower on a CPU (docs/benchmarks.md, 2026-12-03 evening).

``generate`` here is ``generate``'s contract for the cases this project samples (left-padded prompts,
sampled or greedy, stop at EOS or after ``max_new_tokens``): one prefill forward, then one token per step
for the rows still running, removing rows from the batch and the ``DynamicCache`` as they finish. The
tokens drawn follow the same distribution (the same logits processors run on the same float32 logits);
only the random stream differs, because finished rows no longer draw. Figures: docs/benchmarks.md
(2026-12-03, night); the design in docs/design.md.

A generation config's repetition penalty (many chat models ship one) is applied as ``generate`` applies
it, before the caller's processors; models whose generation config asks for other processors (bad words,
minimum lengths, ...) go through ``model.generate`` unchanged (``can_compact``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from pipeline import fast_decode
from pipeline.sequences import position_ids_from

# Generation-config fields whose non-default values ``generate`` turns into logits processors or stopping
# criteria that the loop below does not apply.
_UNSUPPORTED = {
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "stop_strings": None,
    "max_time": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "guidance_scale": None,
    "watermarking_config": None,
    "remove_invalid_values": False,
}

# Cache layers whose ``batch_select_indices`` drops rows from everything they hold (key/value tensors only).
_ROW_SELECTABLE = {"DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer", "DummyLayer"}

# Tokens per prompt-forward chunk in ``prefill`` (rows x the chunk's longest prompt).
PREFILL_CHUNK_TOKENS = 4096
# Tokens per chunk in ``scoring_forward`` (rows x the chunk's longest prompt and response).
SCORING_CHUNK_TOKENS = 1024
# Tokens per packed sequence in ``packed_last_outputs`` (its attention mask is this squared).
PACK_TOKENS = 1024


def can_compact(model, **overrides) -> str | None:
    """None when ``generate`` below reproduces ``model.generate`` for this model and these arguments (up to
    rounding: smaller batches change the matrix shapes, so bf16 logits can differ in their last bits), else why
    not: processors it does not apply, or a cache whose rows it cannot drop (recurrent or linear-attention
    state, custom caches)."""
    from transformers import DynamicCache

    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return f"{type(model).__name__} does not use transformers' DynamicCache"
    odd = sorted({type(layer).__name__ for layer in DynamicCache(config=model.config).layers} - _ROW_SELECTABLE)
    if odd:  # e.g. a linear-attention or hybrid layer, whose recurrent state batch_select_indices leaves as it was
        return f"its cache has layers whose rows it cannot drop ({', '.join(odd)})"
    odd = generation_config_settings(model, **overrides)
    return f"the generation config sets {odd[0]}" if odd else None


def generation_config_settings(model, repetition_penalty: bool = False, **overrides) -> list[str]:
    """``key=value`` for each setting of ``model``'s generation config (or ``overrides``) that ``generate`` would
    act on beyond plain sampling: the processors ``generate`` below does not apply, and with
    ``repetition_penalty`` that penalty too (applied on both paths, it changes the distribution sampled from)."""
    config = getattr(model, "generation_config", None)
    checks = {**_UNSUPPORTED, **({"repetition_penalty": 1.0} if repetition_penalty else {})}
    out = []
    for key, default in checks.items():
        value = overrides.get(key, getattr(config, key, default) if config is not None else default)
        if value not in (default, None) and not (key == "min_length" and value == 0):
            out.append(f"{key}={value!r}")
    return out


class RowsRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """``generate``'s repetition penalty (``prompt_ignore_length`` = each row's left padding, as ``generate`` sets
    it) for a batch that loses rows: ``set_rows`` picks the running rows' padding lengths before each step."""

    def __init__(self, penalty: float, padding_lengths: Tensor):
        super().__init__(float(penalty), prompt_ignore_length=padding_lengths)
        self.padding_lengths = padding_lengths

    def set_rows(self, rows: Tensor, batch_size: int) -> None:
        self.prompt_ignore_length = self.padding_lengths[rows]


def _forward_keywords(model) -> tuple[str, bool]:
    """The forward's name for the KV cache (``cache`` in newer transformers, ``past_key_values`` before), and
    whether it takes ``logits_to_keep`` (the prefill then projects only the last position onto the vocabulary)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _eos_ids(eos_token_id, device) -> Tensor:
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return torch.tensor([i for i in ids if i is not None], dtype=torch.long, device=device)


def _shared_prefix_length(input_ids: Tensor, lengths: Tensor) -> int:
    """How many leading tokens every row's prompt shares (a chat template's system turn), leaving each row at
    least one token of its own: the logits of its last position come from its own forward."""
    B, P = input_ids.shape
    shortest = int(lengths.min())
    if B < 2 or shortest < 2:
        return 0
    starts = (P - lengths).unsqueeze(1)
    heads = input_ids.gather(1, starts + torch.arange(shortest - 1, device=input_ids.device))
    same = (heads == heads[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def can_share_prefill(model, attention_mask: Tensor) -> str | None:
    """None when ``prefill`` below may split the prompt batch, else why not. It builds a plain DynamicCache
    layer by layer and masks holes between a shared prefix and a row's own tokens, so it needs full-attention
    cache layers only and an attention that takes any 0/1 mask (eager or SDPA); and left-padded rows."""
    return _cannot_split(model, attention_mask, "left")


def _cannot_split(model, attention_mask: Tensor, padded: str) -> str | None:
    """Why a forward of ``model`` over a batch ``padded`` on the left or right cannot be split into a shared
    prefix and the rest, or None: it needs a plain DynamicCache of full-attention layers, an attention that takes
    any 0/1 mask (eager or SDPA), and rows padded on that side."""
    from transformers import DynamicCache

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds != {"DynamicLayer"}:
        return f"its cache has layers other than full attention ({', '.join(sorted(kinds))})"
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (eager or sdpa needed)"
    mask = attention_mask.long()
    if not torch.equal(mask, (mask.cummax(1) if padded == "left" else mask.cummin(1)).values):
        return "its prompts are not left-padded" if padded == "left" else "its rows are not right-padded"
    return None


def causal_lm_run(model, logits_to_keep: bool = True):
    """``scoring_forward``'s ``run`` for a causal LM (or a PEFT model around one): its logits at the last ``k``
    positions, projected onto the vocabulary only there where the forward takes ``logits_to_keep``."""

    def run(ids: Tensor, mask: Tensor, positions: Tensor, cache_kwargs: dict, k: int, **extra) -> Tensor:
        keep = {"logits_to_keep": k} if logits_to_keep else {}
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=bool(cache_kwargs),
                     **keep, **cache_kwargs, **extra).logits[:, -k:]  # fmt: skip

    return run


def score_head_run(model):
    """``scoring_forward``'s ``run`` for a decoder sequence-classification model (a reward or value model; a PEFT
    model around one): the score head on the last ``k`` positions ``[B, k]`` (float32), or None where the model
    is not a decoder with a ``score`` head over its backbone (an encoder reward model, say). Inside PEFT the
    backbone's LoRA layers and the wrapped score head follow the active adapter, or none under
    ``disable_adapter()``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if backbone is None or not hasattr(inner, "score") or "ForSequenceClassification" not in type(inner).__name__:
        return None
    if not {"cache", "past_key_values"} & set(inspect.signature(backbone.forward).parameters):
        return None

    def run(ids: Tensor, mask: Tensor, positions: Tensor, cache_kwargs: dict, k: int, **extra) -> Tensor:
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=bool(cache_kwargs),
                          **cache_kwargs, **extra).last_hidden_state  # fmt: skip
        return inner.score(hidden[:, -k:]).squeeze(-1).float()

    run.model = inner  # the transformers model whose config and cache ``scoring_forward`` uses
    return run


def _shared_prefix(run, model, input_ids: Tensor, lengths: Tensor, c: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the keys and values of the ``c`` tokens every left-padded row starts with, run once as one
    row through ``run`` (``scoring_forward``'s signature)."""
    from transformers import DynamicCache

    if not c:
        return []
    start = int(input_ids.shape[1] - lengths[0])
    cache = DynamicCache(config=model.config)
    run(input_ids[:1, start : start + c], lengths.new_ones(1, c), torch.arange(c, device=input_ids.device)[None],
        {_forward_keywords(model)[0]: cache}, 1)  # fmt: skip
    return [(layer.keys, layer.values) for layer in cache.layers]


def _chunk_cache(model, shared: list[tuple[Tensor, Tensor]], rows: int):
    """A new ``DynamicCache`` holding the shared prefix for each of ``rows`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(shared):
        cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)
    return cache


def length_chunks(own: Tensor, answered: Tensor, budget: int):
    """Rows sorted by ``own + answered`` (longest first), grouped while the group, cut to its longest ``own``
    and longest ``answered``, stays within ``budget`` tokens (at least one row each): ``(rows, w, rc)``."""
    order = torch.argsort(own + answered, descending=True, stable=True).tolist()
    i = 0
    while i < len(order):
        rows, w, rc = [], 0, 0
        while i < len(order):
            r = order[i]
            w2, rc2 = max(w, int(own[r])), max(rc, int(answered[r]))
            if rows and (w2 + rc2) * (len(rows) + 1) > budget:
                break
            rows.append(r)
            w, rc, i = w2, rc2, i + 1
        yield rows, w, rc


def prefill(model, input_ids: Tensor, attention_mask: Tensor, *, chunk_tokens: int | None = None, split: bool = True):
    """The prompt forward of a decoding loop: ``(last-position logits [B, 1, V], cache)``, the cache laid out
    as one forward over the left-padded batch lays it out, computed with less work:

    - the prefix every prompt shares (a chat template's system turn: 20 of the embedded task's 41-77 prompt
      tokens) runs once, as one row, and its keys and values are copied to every row;
    - the rest runs in chunks of about ``chunk_tokens`` tokens, rows sorted by length, so that a chunk pads
      its rows to its own longest rather than to the batch's (the embedded evaluation's 200 prompts are 27%
      padding as one batch; ``chunk_tokens`` defaults to ``PREFILL_CHUNK_TOKENS``).

    Positions and masks are those of the single forward, so the logits and the cache are the same up to
    floating-point rounding (the matmuls see other shapes). Where ``can_share_prefill`` says no, or with
    ``split=False``, it is that single forward."""
    from transformers import DynamicCache

    chunk_tokens = chunk_tokens or PREFILL_CHUNK_TOKENS
    cache_keyword, keep_last = _forward_keywords(model)
    run = causal_lm_run(model, keep_last)
    mask = attention_mask.long()
    B, P = input_ids.shape
    if not split or can_share_prefill(model, mask) is not None:
        cache = DynamicCache(config=model.config)
        return run(input_ids, mask, position_ids_from(mask), {cache_keyword: cache}, 1), cache
    device = input_ids.device
    lengths = mask.sum(1)
    c = _shared_prefix_length(input_ids, lengths)
    shared = _shared_prefix(run, model, input_ids, lengths, c)
    own = lengths - c  # each row's tokens after the prefix
    logits, full = None, None
    for rows, width, _ in length_chunks(own, torch.zeros_like(own), chunk_tokens):
        idx = torch.tensor(rows, device=device)
        n = own[idx]
        ids = input_ids[idx, P - width :]  # a shorter row's first columns are the prefix's end: masked here
        sub = (torch.arange(width, device=device) >= width - n.unsqueeze(1)).long()
        cache = _chunk_cache(model, shared, len(rows))
        cmask = torch.cat([sub.new_ones(len(rows), c), sub], 1)
        out_logits = run(ids, cmask, position_ids_from(cmask)[:, c:], {cache_keyword: cache}, 1)
        # Row j's real tokens end the single forward's row (columns P - c - n_j .. P); here the prefix is at
        # columns 0..c and its own tokens end the chunk (c + width - n_j .. c + width).
        offset = torch.arange(P, device=device) - (P - c - n).unsqueeze(1)  # index into the row's real tokens
        src = torch.where(offset < c, offset, offset + width - n.unsqueeze(1)).clamp(min=0)
        if logits is None:
            logits = out_logits.new_empty((B, 1, out_logits.shape[-1]))
            full = [(layer.keys.new_zeros((B, *layer.keys.shape[1:2], P, layer.keys.shape[-1])),
                     layer.values.new_zeros((B, *layer.values.shape[1:2], P, layer.values.shape[-1])))
                    for layer in cache.layers]  # fmt: skip
        logits[idx] = out_logits
        for (fk, fv), layer in zip(full, cache.layers):
            at = src[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            fk[idx] = layer.keys.gather(2, at)
            at = src[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[-1])
            fv[idx] = layer.values.gather(2, at)
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(full):
        cache.update(k, v, layer)
    return logits, cache


def scoring_forward(run, model, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, keep: int, *,
                    chunk_tokens: int | None = None, split: bool = True, capture=None):  # fmt: skip
    """The outputs of the last ``keep`` positions ``[B, keep, ...]`` of a forward over prompts (the first
    ``prompt_length`` columns, left-padded) and their responses (right-padded, the last ``keep - 1`` columns
    at most): what the rollout and the evaluation score, log-probs or values. As ``prefill`` does for the
    prompts alone, the prefix every prompt shares runs once and the rows run in length-sorted chunks of about
    ``chunk_tokens`` (default ``SCORING_CHUNK_TOKENS``), each cut to its own longest prompt and response; the
    positions after a chunk's longest response, masked in every row, come back as zeros.

    ``run(input_ids, attention_mask, position_ids, cache_kwargs, keep)`` is one forward of ``model`` (the
    transformers model whose config and cache it uses; PEFT wrappers go in ``run``), returning the outputs of
    its last ``keep`` positions; ``cache_kwargs`` is ``{}`` or the forward's cache keyword with a
    ``DynamicCache`` of the shared prefix. Where ``can_share_prefill`` says no, or with ``split=False``, it is
    one forward over the whole batch.

    ``capture`` (a module of the forward, such as a decoder layer): also return that module's input hidden
    states ``[B, L, ...]`` laid out as one forward over the padded batch would give them, zeros at masked
    positions: ``(outputs, hidden)``."""
    if capture is None:
        return _scoring_forward(run, model, input_ids, attention_mask, prompt_length, keep, chunk_tokens, split)
    seen = []
    handle = capture.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        out = _scoring_forward(run, model, input_ids, attention_mask, prompt_length, keep, chunk_tokens, split,
                               seen)  # fmt: skip
    finally:
        handle.remove()
    return out


def _scoring_forward(run, model, input_ids, attention_mask, prompt_length, keep, chunk_tokens, split, seen=None):
    B, L = input_ids.shape
    P = prompt_length
    mask = attention_mask.long()
    response = mask[:, P:]
    whole = (
        not split
        or keep > L - P + 1
        or can_share_prefill(model, mask[:, :P]) is not None
        or not torch.equal(response, response.cummin(1).values if response.shape[1] else response)
    )
    if whole:
        out = run(input_ids, mask, position_ids_from(mask), {}, keep)
        if seen is None:
            return out
        return out, seen[-1].masked_fill(mask[..., None] == 0, 0)
    chunk_tokens = chunk_tokens or SCORING_CHUNK_TOKENS
    cache_keyword = _forward_keywords(model)[0]
    device = input_ids.device
    prompts = mask[:, :P].sum(1)
    c = _shared_prefix_length(input_ids[:, :P], prompts)
    shared = _shared_prefix(run, model, input_ids[:, :P], prompts, c)
    own, answered = prompts - c, response.sum(1)
    full, hidden = None, None
    if seen is not None and c:
        prefix_hidden = seen.pop()[0]  # [c, ...]: the shared prefix, run once as one row
    for rows, w, rc in length_chunks(own, answered, chunk_tokens):
        idx = torch.tensor(rows, device=device)
        ids = input_ids[idx, P - w : P + rc]
        head = (torch.arange(w, device=device) >= w - own[idx].unsqueeze(1)).long()  # the prefix's end: masked
        sub = torch.cat([head, response[idx, :rc]], 1)
        kv = {cache_keyword: _chunk_cache(model, shared, len(rows))} if c else {}
        cmask = torch.cat([sub.new_ones(len(rows), c), sub], 1)
        # The window is columns L - keep .. L of the batch; the chunk ends at column P + rc, after which every
        # row of it is masked (zeros). ``k`` of its last positions fall in the window (at least one is run).
        k = max(1, keep - (L - P - rc))
        out = run(ids, cmask, position_ids_from(cmask)[:, c:], kv, k)
        if full is None:
            full = out.new_zeros((B, keep, *out.shape[2:]))
        start = P + rc - k - (L - keep)
        if start + k > 0:
            full[idx, max(start, 0) : start + k] = out[:, max(-start, 0) :]
        if seen is not None:  # the chunk's columns are the batch's P - w .. P + rc
            h = seen.pop()
            if hidden is None:
                hidden = h.new_zeros((B, L, *h.shape[2:]))
            hidden[idx, P - w : P + rc] = h
    if seen is None:
        return full
    if c:  # each row's shared prefix ends where its own prompt tokens start
        for r in range(B):
            end = P - int(own[r])
            hidden[r, end - c : end] = prefix_hidden
    return full, hidden.masked_fill(mask[..., None] == 0, 0)


def has_active_dropout(model) -> bool:
    """Whether a forward of ``model`` in its current mode draws dropout masks (a dropout module with ``p > 0``, or
    a ``*dropout*`` rate in its config, while training). Sharing a prefix's forward between rows would give
    those rows one mask where separate forwards give each its own."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    configs = [getattr(m, "config", None) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None and hasattr(c, "to_dict")}.values():
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return True
    return False


def group_prefix_lengths(input_ids: Tensor, lengths: Tensor, groups: Tensor) -> tuple[int, Tensor]:
    """For right-padded rows ``[N, L]`` of ``lengths`` tokens in ``groups`` (a group id per row, ``0..G-1``):
    ``(c, shared [G])``, the leading tokens every row shares (a chat template's system turn) and those every row
    of each group shares (a preference pair's prompt), each leaving every row at least one token of its own."""
    L = input_ids.shape[1]
    G = int(groups.max()) + 1
    device = input_ids.device
    inside = torch.arange(L, device=device) < (lengths - 1).unsqueeze(1)  # a row's last token is its own

    def common(reference: Tensor) -> Tensor:  # per row: how many leading tokens equal the reference row's
        return ((input_ids == reference) & inside).long().cumprod(1).sum(1)

    rows = torch.arange(len(groups), device=device)
    first = torch.full((G,), len(groups), dtype=torch.long, device=device).scatter_reduce(0, groups, rows, "amin")
    shared = torch.full((G,), L, dtype=torch.long, device=device)
    shared = shared.scatter_reduce(0, groups, common(input_ids[first[groups]]), "amin")
    c = int(common(input_ids[:1]).min())
    return min(c, int(shared.min())), shared


def can_pack_prefixes(model, attention_mask: Tensor) -> str | None:
    """None when ``packed_last_outputs`` may run this batch, else why not: full-attention layers only (a custom mask
    would reach past a sliding window), eager or SDPA attention (which take a custom 4D mask), right-padded rows,
    and no dropout (one forward of a shared prefix would give all its rows one dropout mask) in a training
    forward."""
    reason = _cannot_split(model, attention_mask, "right")
    if reason:
        return reason
    if not bool(attention_mask[:, 0].all()):
        return "a row is empty"
    if has_active_dropout(model):
        return "dropout is active"
    return None


def packed_scorer(model, input_ids: Tensor, attention_mask: Tensor):
    """``score_head_run(model)`` where ``packed_last_outputs`` through it gives the scores the model's own forward
    gives this right-padded batch, else None: a decoder with a score head and a pad id, ``can_pack_prefixes``,
    and no text ending in the pad id (the model's pooling reads the last token that is not the pad id)."""
    run = score_head_run(model)
    if run is None or can_pack_prefixes(run.model, attention_mask):
        return None
    pad = run.model.config.pad_token_id
    last = input_ids.gather(1, (attention_mask.long().sum(1, keepdim=True) - 1).clamp(min=0))
    return None if pad is None or bool((last == pad).any()) else run


class Pack:
    """Rows of a batch packed into one sequence as a prefix tree (``pack_groups``): ``ids``, ``positions`` (each
    token's column in its own row), ``visible`` ``[T, T]`` (token i attends to token j: j is on i's row path and
    not after it), the batch ``rows`` it holds, ``last`` (where each of them ends in the sequence) and ``spans``
    ``[c, e_1, ..., e_G]``: the tokens every row shares are ``[0, c)``, group g's are ``[e_{g-1}, e_g)`` (``e_0 =
    c``), and a group's tokens see only their own group's and the shared ones."""

    def __init__(self, ids: Tensor, positions: Tensor, owners: Tensor, rows: list[int], last: Tensor,
                 spans: list[int]):  # fmt: skip
        self.ids, self.positions, self.rows, self.last, self.spans = ids, positions, rows, last, spans
        # owners [T, n]: which of the pack's rows each token belongs to (the shared prefix: all of them; a group's
        # prompt: its rows; a row's own tokens: that row). j is on i's path when j belongs to every row i does.
        outside = (~owners).float()
        self.visible = (owners.float() @ outside.T == 0) & (positions[None, :] <= positions[:, None])

    def attention_mask(self, model) -> Tensor:
        """``visible`` as the 4D mask ``[1, 1, T, T]`` the model's attention takes as given: boolean for SDPA,
        additive for eager."""
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            return self.visible[None, None]
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device).masked_fill(
            ~self.visible, torch.finfo(dtype).min
        )[None, None]


def pack_groups(input_ids: Tensor, lengths: Tensor, groups: Tensor, budget: int) -> list[Pack]:
    """Right-padded rows as prefix-tree sequences of about ``budget`` tokens (whole groups each, at least one): the
    tokens every row shares once (a system turn), then per group the tokens its rows share once (a preference
    pair's prompt), then each row's own tokens; no padding."""
    device = input_ids.device
    c, shared = group_prefix_lengths(input_ids, lengths, groups)
    members = [[] for _ in range(len(shared))]  # each group's rows, in order: its first row leads
    for r, g in enumerate(groups.tolist()):
        members[g].append(r)
    sizes = [int(shared[g]) - c + sum(int(lengths[r] - shared[g]) for r in rows) for g, rows in enumerate(members)]
    bins, size = [[]], c
    for g in range(len(members)):
        if bins[-1] and size + sizes[g] > budget:
            bins, size = [*bins, []], c
        bins[-1].append(g)
        size += sizes[g]
    packs = []
    for gs in bins:
        rows = [r for g in gs for r in members[g]]
        col = {r: i for i, r in enumerate(rows)}
        ids, pos, owner, last = [input_ids[rows[0], :c]], [torch.arange(c, device=device)], [], []
        owner.append(torch.ones(c, len(rows), dtype=torch.bool, device=device))
        end = c
        spans = [c]
        for g in gs:
            s = int(shared[g])
            ids.append(input_ids[members[g][0], c:s])
            pos.append(torch.arange(c, s, device=device))
            o = torch.zeros(s - c, len(rows), dtype=torch.bool, device=device)
            o[:, [col[r] for r in members[g]]] = True
            owner.append(o)
            end += s - c
            for r in members[g]:
                n = int(lengths[r])
                ids.append(input_ids[r, s:n])
                pos.append(torch.arange(s, n, device=device))
                o = torch.zeros(n - s, len(rows), dtype=torch.bool, device=device)
                o[:, col[r]] = True
                owner.append(o)
                end += n - s
                last.append(end - 1)
            spans.append(end)
        packs.append(Pack(torch.cat(ids), torch.cat(pos), torch.cat(owner), rows, torch.tensor(last, device=device),
                          spans))  # fmt: skip
    return packs


def packed_last_outputs(run, model, input_ids: Tensor, attention_mask: Tensor, groups: Tensor, *,
                        budget: int) -> Tensor:  # fmt: skip
    """The outputs at each right-padded row's last token ``[N, ...]``, as one forward over the batch gives them,
    with every shared prefix computed once and no padding: the rows run packed as prefix trees (``pack_groups``:
    the tokens every row shares, then each group's shared tokens, e.g. a preference pair's prompt, then each row's
    own), one forward per pack of about ``budget`` tokens, each token attending to the tokens of its own row
    before it, at its own row's positions. The outputs agree with one forward's to rounding, and so do their
    gradients: a shared prefix's backward runs once and sums what every row sends it. ``run`` is
    ``scoring_forward``'s (called with the 4D mask and ``{}`` for the cache); the caller checks
    ``can_pack_prefixes`` first.

    Under SDPA the attention runs one group at a time (``segmented_sdpa``): a pack's dense mask is mostly
    zeros (groups do not see each other), and SDPA computes every masked score anyway."""
    out = None
    segmented = can_segment(model)
    for pack in pack_groups(input_ids, attention_mask.long().sum(1), groups, budget):
        mask = pack.attention_mask(model)  # before the switch: SDPA's boolean mask
        with segmented_attention(model) if segmented else contextlib.nullcontext():
            extra = {"pack_spans": pack.spans} if segmented else {}
            got = run(pack.ids[None], mask, pack.positions[None], {}, len(pack.ids), **extra)[0]
        last = got[pack.last]
        if out is None:
            out = last.new_zeros((len(groups), *last.shape[1:]))
        out = out.index_put((torch.tensor(pack.rows, device=input_ids.device),), last)
    return out


# The name ``segmented_sdpa`` is registered under, for ``packed_last_outputs`` to switch an SDPA model to.
SEGMENTED_SDPA = "rlhf_segmented_sdpa"


def segmented_sdpa(module, query, key, value, attention_mask, pack_spans=None, **kwargs):
    """transformers' SDPA attention over a packed prefix-tree sequence (``Pack``), one group at a time: the shared
    tokens ``[0, c)`` over themselves, then each group's tokens over the shared ones and their own, each with its
    block of the pack's mask. The same attention as one call over the whole mask (tokens of other groups are
    masked there; equal to rounding: in float32 in the tests, scores to 1e-5 and gradients to a relative 1e-4),
    without computing the masked scores: with the embedded reward pairs' packs of ~1,000 tokens, most of them.
    Without ``pack_spans`` (a forward that is not a pack's), or for another length, it is plain SDPA: the function
    registered as ``"sdpa"`` at the call (``pipeline.grouped_attention.grouped_sdpa`` may stand in for it)."""
    from transformers import AttentionInterface

    sdpa_attention_forward = AttentionInterface._global_mapping["sdpa"]

    if pack_spans is None or attention_mask is None or query.shape[2] != pack_spans[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    c = pack_spans[0]
    outs = [sdpa_attention_forward(module, query[:, :, :c], key[:, :, :c], value[:, :, :c],
                                   attention_mask[:, :, :c, :c], **kwargs)[0]]  # fmt: skip
    for s, e in zip(pack_spans[:-1], pack_spans[1:]):
        k = torch.cat([key[:, :, :c], key[:, :, s:e]], 2)
        v = torch.cat([value[:, :, :c], value[:, :, s:e]], 2)
        m = torch.cat([attention_mask[:, :, s:e, :c], attention_mask[:, :, s:e, s:e]], 3)
        outs.append(sdpa_attention_forward(module, query[:, :, s:e], k, v, m, **kwargs)[0])
    return torch.cat(outs, 1), None  # [B, T, heads, head_dim], as SDPA's


def can_segment(model) -> bool:
    """Whether ``packed_last_outputs`` runs ``model``'s attention one group at a time: SDPA models with one
    config (no sub-configs, whose own implementations the switch would overwrite) and without activation
    checkpointing (whose backward re-runs the forward after the switch is undone)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sub_configs", None):
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@contextlib.contextmanager
def segmented_attention(model):
    """``model``'s layers call ``segmented_sdpa`` (registered as ``SEGMENTED_SDPA``) inside the block
    (transformers reads ``config._attn_implementation`` at each call); the implementation it had after. For one
    thread's forwards: another forward of the model inside the block would take ``segmented_sdpa`` too."""
    from transformers import AttentionInterface

    if SEGMENTED_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)
    before = model.config._attn_implementation
    model.config._attn_implementation = SEGMENTED_SDPA
    try:
        yield
    finally:
        model.config._attn_implementation = before


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id,
    pad_token_id: int | None,
    logits_processor=None,
    split_prefill: bool = True,
    fused_steps: bool = True,
    **ignored_sampling_flags,
) -> Tensor:
    """Prompt + new tokens ``[B, P + T]`` (``T <= max_new_tokens``), rows padded with ``pad_token_id`` after
    their EOS, as ``model.generate(..., do_sample=False, logits_processor=...)`` returns them. As there, a
    missing ``pad_token_id`` falls back to the first EOS id.

    The next token is the argmax of ``logits_processor(input_ids, logits)``: greedy decoding with no
    processor, sampling with the processors of ``pipeline.sampling.sampling_kwargs`` (temperature, top-k/p,
    then the inverse-CDF draw, which leaves the drawn token the only finite score). A processor with a
    ``set_rows(rows, batch_size)`` method is told, before each step, which of the original rows the step's
    scores belong to. ``split_prefill=False`` runs the prompts as one forward (see ``prefill``), for
    benchmarks. The steps after the prompt forward run through ``pipeline.fast_decode.Decoder`` where it
    supports the model (the same logits, with fused products); ``fused_steps=False`` runs them through the
    model's forward. ``ignored_sampling_flags`` takes ``sampling_kwargs``' greedy-mode keys
    (``do_sample=False``, ``temperature=None``, ...)."""

    for key, value in ignored_sampling_flags.items():
        if key not in ("do_sample", "temperature", "top_k", "top_p") or (key == "do_sample" and value):
            raise TypeError(f"pipeline.decoding.generate: unsupported argument {key}={value!r}")
    B, P = input_ids.shape
    device = input_ids.device
    eos = _eos_ids(eos_token_id, device)
    if pad_token_id is None:
        if not len(eos):
            raise ValueError("pipeline.decoding.generate: give a pad_token_id or an eos_token_id")
        pad_token_id = int(eos[0])
    if max_new_tokens < 1:
        return input_ids
    new = torch.full((B, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    rows = torch.arange(B, device=device)  # the original row of each row still running
    mask = attention_mask.long()
    positions = position_ids_from(mask)
    penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
    if penalty not in (None, 1.0):  # generate puts the config's processors before the caller's
        padding = (mask != 0).int().argmax(dim=1)
        logits_processor = LogitsProcessorList([RowsRepetitionPenalty(penalty, padding), *(logits_processor or [])])
    fusable = fused_steps and max_new_tokens > 1 and fast_decode.unsupported_reason(model) is None
    with fast_decode.stacked_projections(model) if fusable else contextlib.nullcontext():
        logits, cache = prefill(model, input_ids, mask, split=split_prefill)
    kv = {_forward_keywords(model)[0]: cache}
    fused = None
    if fusable:
        fused = fast_decode.Decoder(model, cache, mask, max_new_tokens - 1)
        del kv, cache  # its keys and values now live in the decoder's buffers
    position = positions[:, -1:] + 1
    seen = input_ids  # the running rows' tokens so far, for processors that read them
    steps = 0
    for t in range(max_new_tokens):
        logits = logits[:, -1, :].float()
        if logits_processor is not None:
            for proc in logits_processor:
                if hasattr(proc, "set_rows"):
                    proc.set_rows(rows, B)
            logits = logits_processor(seen, logits)
        # The inverse-CDF draw leaves its token the only finite score: the argmax, without a pass over the scores.
        drawn = getattr(logits_processor[-1], "drawn", None) if logits_processor else None
        token = drawn if drawn is not None else logits.argmax(-1)
        new[rows, t] = token
        steps = t + 1
        running = ~torch.isin(token, eos)
        if t == max_new_tokens - 1 or not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if fused is not None:
                fused.select(keep)
            else:
                cache.batch_select_indices(keep)
            rows, mask, position, token, seen = rows[keep], mask[keep], position[keep], token[keep], seen[keep]
        seen = torch.cat([seen, token.unsqueeze(1)], 1)
        if fused is not None:
            logits = fused.step(token, position)
        else:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                           **kv).logits  # fmt: skip
        position = position + 1
    return torch.cat([input_ids, new[:, :steps]], 1)
