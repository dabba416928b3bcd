"""Decoding steps of a Llama-family model on a CPU, with the products that read one input fused.

A decoding step of a few rows is a matrix-vector product per row at every linear layer: its time is the
products over every weight, and the fixed cost of each call and operation. transformers' forward makes seven
such calls per layer (q, k, v, o, gate, up, down), builds a 4-D attention mask and concatenates every layer's
key/value cache at every step. On the 2-core AVX512-BF16 host, one step's layer products for 8 rows of
SmolLM2-135M in bf16 take 16.9 ms as seven products per layer and 11.0 ms as four, and the PPO benchmark's
rollout (8 prompts x 32 sampled tokens) 1.45 s through the forward and 1.05 s here
(``benchmarks/bench_kernels.py fused-decoding``, docs/benchmarks.md, 2026-12-05 later sitting).

``Decoder`` runs the steps after the prompt forward (``pipeline.decoding.prefill``) with

- q, k and v as one oneDNN inner product on a packed ``[q; k; v]`` weight, and gate and up as another;
- the key/value cache in one buffer per layer sized for the whole response (keys, then values), written in
  place with one copy per step;
- the attention mask kept as a boolean buffer, sliced per step and turned into SDPA's additive mask once per
  step rather than once per layer.

The prompt forward runs on the same stacked weights (``stacked_projections``), so q, k, v, gate and up keep no
packed copies of their own.

Everything else calls the model's own modules in transformers' order (embedding, RMSNorm, rotary embedding,
activation, final norm, vocabulary projection) or repeats its arithmetic (``apply_rotary_pos_emb``'s, on q's
and k's heads as one tensor, with ``rotate_half(x) * sin`` as ``roll(x) * (sign * sin)``, an exact sign flip;
elementwise, so the same bits), and attention is the SDPA call transformers' ``sdpa_attention_forward`` makes
for one query position (with a mask: the query heads grouped per key/value head; without one: ``enable_gqa``).
The logits are the same bits as ``model(input_ids=token, ..., cache=...)``'s: oneDNN computes each output
column of an inner product on its own, so a fused product's columns equal the separate products' (checked once
per process on the shapes of the model, ``fused_supported``, and in tests/test_fast_decode.py, which compares
every step's logits with transformers' forward). So nothing sampled or learned changes.

Used where every decoding step would take the packed bf16 path (``pipeline/packed_linear.py``): a CPU with
oneDNN bf16, bf16 weights, a plain ``LlamaForCausalLM`` with SDPA attention and no biases. Anything else (other
architectures, float32, accelerators, PEFT-wrapped models) decodes through the model's forward;
``unsupported_reason`` says why. The stacked copies cost memory: a packed bf16 copy of every layer's stacked
q/k/v and gate/up weights (139 MB for SmolLM2-135M), rebuilt when a weight changes (``MergedPolicy.sync``;
``stack_weights`` lets it pack them without concatenating first); o and down use their ``PackedLinear``'s own
packed copies. Why by hand: ``torch.compile`` fuses the same and more, but its first compile took 61 s on this
host and its kernels round differently (docs/benchmarks.md, 2026-12-03 evening).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import Tensor

from pipeline import packed_linear

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")  # fmt: skip
_ALONE = ("self_attn.o_proj", "mlp.down_proj")  # each reads an input of its own: not stacked

# model -> (weight versions, per-layer packed (qkv, gate_up)); weak, so a model's copies die with it.
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def fused_supported(shapes: tuple[tuple[int, tuple[int, ...]], ...]) -> bool:
    """Whether one packed product over stacked weights gives the separate packed products' bits here, for
    ``shapes`` (``(in_features, (out_features, ...))`` per fused group) and a few row counts."""
    gen = torch.Generator().manual_seed(0)
    for n_in, outs in shapes:
        ws = [(torch.randn(o, n_in, generator=gen) * n_in**-0.5).to(torch.bfloat16) for o in outs]
        fused = packed_linear._pack(torch.cat(ws))
        parts = [packed_linear._pack(w) for w in ws]
        for rows in (1, 3, 8, 33, 97, 600):  # decoding steps, and prompt forwards (stacked_projections)
            x = torch.randn(rows, n_in, generator=gen).to(torch.bfloat16)
            whole = packed_linear._packed_product(x, fused, None)
            if not torch.equal(whole, torch.cat([packed_linear._packed_product(x, p, None) for p in parts], -1)):
                return False
    return True


def _layer_shapes(model) -> tuple[tuple[int, tuple[int, ...]], ...]:
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return (
        (attn.q_proj.in_features, (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)),
        (mlp.gate_proj.in_features, (mlp.gate_proj.out_features, mlp.up_proj.out_features)),
    )


def unsupported_reason(model) -> str | None:
    """Why ``Decoder`` cannot run ``model``'s decoding steps with the model's own bits, or None when it can."""
    from transformers import LlamaForCausalLM

    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    config = model.config
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r} (needs 'sdpa')"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the projections have biases"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if not packed_linear.supported() or not torch.backends.mkldnn.enabled:
        return "oneDNN's packed bf16 product is not available"
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return "CPU autocast to a dtype other than bf16"
    for name, param in model.named_parameters():
        if param.device.type != "cpu" or param.dtype != torch.bfloat16:
            return f"{name} is {param.dtype} on {param.device.type} (needs bf16 on the CPU)"
        if param.requires_grad:
            return f"{name} requires grad"
    for i, layer in enumerate(model.model.layers):
        for name in _PROJECTIONS:
            mod = layer.get_submodule(name)
            hooked = mod._forward_hooks or mod._forward_pre_hooks or "forward" in vars(mod)  # (accelerate's hooks)
            if type(mod) is not packed_linear.PackedLinear or hooked:
                return f"layer {i}'s {name} is not a hook-free PackedLinear"
    if not fused_supported(_layer_shapes(model)):
        return "a fused packed product does not give the separate products' bits here"
    return None


def stack_weights(model) -> None:
    """Give each layer's q, k and v weights, and its gate and up weights, one tensor: consecutive rows of it, each
    module's weight a view (the same values). ``_fused_weights`` then packs that tensor as it is rather than a
    concatenated copy, after every in-place weight update (``MergedPolicy.sync``): 139 MB less to copy per sync
    for SmolLM2-135M."""
    for layer in model.model.layers:
        for names in (_PROJECTIONS[:3], _PROJECTIONS[4:6]):
            mods = [layer.get_submodule(n) for n in names]
            whole, row = torch.cat([m.weight.detach() for m in mods]), 0
            for m in mods:
                m.weight = torch.nn.Parameter(whole[row : row + m.out_features], requires_grad=m.weight.requires_grad)
                row += m.out_features


def _stack(weights: list[Tensor]) -> Tensor:
    """``torch.cat(weights)`` (along the rows), without the copy where they already are consecutive rows of one
    tensor (``stack_weights``)."""
    first, width = weights[0], weights[0].shape[1]
    storage, at = first.untyped_storage().data_ptr(), first.data_ptr()
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != storage or w.data_ptr() != at:
            return torch.cat(weights)
        at += w.numel() * w.element_size()
    return first.as_strided((sum(w.shape[0] for w in weights), width), (width, 1))


def _fused_weights(model) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per layer: packed ``[q; k; v]``, ``o``, ``[gate; up]`` and ``down`` weights. The stacked ones are held here
    and rebuilt when any of their weights changed since they were made (``copy_`` under ``no_grad`` bumps its
    version); ``o`` and ``down`` are their own ``PackedLinear``'s packed copies, which it keeps current itself."""
    layers = model.model.layers
    stacked = [[layer.get_submodule(n).weight for n in _PROJECTIONS if n not in _ALONE] for layer in layers]
    key = tuple((w.data_ptr(), w._version) for ws in stacked for w in ws)
    held = _FUSED.get(model)
    if held is None or held[0] != key:
        pack = packed_linear._pack
        fused = [(pack(_stack([q, k, v])), pack(_stack([g, u]))) for q, k, v, g, u in stacked]
        _FUSED[model] = held = (key, fused)
    return [(qkv, layer.self_attn.o_proj.packed_weight()[0], gate_up, layer.mlp.down_proj.packed_weight()[0])
            for (qkv, gate_up), layer in zip(held[1], layers)]  # fmt: skip


class _Stacked:
    """One stacked product standing in for several projections of the same input (``stacked_projections``): the
    first projection called on an input computes all of them; the others return their columns of it."""

    def __init__(self, packed: Tensor, widths: list[int]):
        self.packed, self.bounds = packed, [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.x = self.y = None

    def part(self, i: int, module, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16 or not x.is_contiguous():  # PackedLinear's own conditions for its product
            return packed_linear.PackedLinear.forward(module, x)
        if self.x is not x:
            self.x, self.y = x, packed_linear._packed_product(x, self.packed, None)
        return self.y[..., self.bounds[i] : self.bounds[i + 1]]


@contextlib.contextmanager
def stacked_projections(model):
    """Within it, ``model``'s forward (transformers' own: the prompt forward before ``Decoder``) runs q, k and v as
    one product on the decoder's stacked ``[q; k; v]`` weight, and gate and up as one on ``[gate; up]``: the same
    bits (``fused_supported``), and those projections need no packed copies of their own besides the stacked
    ones, which the decoder then uses (for SmolLM2-135M, 139 MB less to pack after every weight sync). Each
    projection returns its columns of the stacked output (a strided view, which the attention and MLP code only
    reshapes or reads elementwise). Call only where ``unsupported_reason(model)`` is None."""
    layers = model.model.layers
    patched = []
    try:
        for (qkv, _, gate_up, _), layer in zip(_fused_weights(model), layers):
            for packed, names in ((qkv, _PROJECTIONS[:3]), (gate_up, _PROJECTIONS[4:6])):
                mods = [layer.get_submodule(n) for n in names]
                group = _Stacked(packed, [m.out_features for m in mods])
                for i, mod in enumerate(mods):
                    mod.forward = functools.partial(group.part, i, mod)
                    patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


class Decoder:
    """The decoding steps after ``prefill``: ``step(token, position)`` -> logits ``[rows, 1, V]`` as the model's
    forward returns them, ``select(keep)`` drops rows. ``cache`` is the prefill's ``DynamicCache`` (its keys and
    values are copied into this decoder's buffers), ``attention_mask`` its ``[B, P]`` mask."""

    def __init__(self, model, cache, attention_mask: Tensor, max_new_tokens: int):
        self.model = model
        self.weights = _fused_weights(model)
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        B, P = attention_mask.shape
        width = P + max_new_tokens
        # Per layer one buffer [B, 2 kv_heads, positions, head_dim]: keys in the first kv_heads, values after, so
        # that a step writes both with one copy from the [q; k; v] product's k and v heads, which sit side by side.
        self.kv = []
        for layer in cache.layers:
            kv = layer.keys.new_empty((B, 2 * self.kv_heads, width, self.head_dim))
            kv[:, : self.kv_heads, :P] = layer.keys
            kv[:, self.kv_heads :, :P] = layer.values
            self.kv.append(kv)
        self.mask = attention_mask.new_ones((B, width), dtype=torch.bool)
        self.mask[:, :P] = attention_mask.bool()
        self.length = P  # positions held in the buffers
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) * [-1.., +1..]: one roll, and the sign (an exact flip)
        # moves onto sin, computed once per step.
        half = self.head_dim // 2
        self.sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(model.model.norm.weight)

    def select(self, keep: Tensor) -> None:
        self.kv = [kv.index_select(0, keep) for kv in self.kv]
        self.mask = self.mask.index_select(0, keep)

    def step(self, token: Tensor, position: Tensor) -> Tensor:
        """Logits ``[n, 1, V]`` of the next position for ``token`` ``[n]`` at ``position`` ``[n, 1]``."""
        lm = self.model.model
        n, L = token.shape[0], self.length
        hd, heads, kvh = self.head_dim, self.heads, self.kv_heads
        groups, inter = heads // kvh, self.intermediate
        product = packed_linear._packed_product
        h = lm.embed_tokens(token.unsqueeze(1))  # [n, 1, d]
        cos, sin = lm.rotary_emb(h, position_ids=position)  # [n, 1, hd]: broadcast over the heads below
        sin = sin * self.sign
        mask = self.mask[:, None, None, : L + 1]
        # transformers' sdpa path: no mask where no running row has padding (then SDPA's own GQA), else the
        # query heads grouped per key/value head against the shared mask, which SDPA turns into an additive
        # float mask (0 / -inf in the query's dtype) at every call: here once per step.
        padded = not bool(mask.all())
        if padded:
            mask = torch.where(mask, 0.0, torch.tensor(float("-inf"), dtype=h.dtype))
        for i, layer in enumerate(lm.layers):
            qkv, o_w, gate_up, down = self.weights[i]
            residual = h
            y = product(layer.input_layernorm(h), qkv, None).view(n, heads + 2 * kvh, hd)
            # apply_rotary_pos_emb's arithmetic, elementwise per head, on q's and k's heads as one tensor,
            # written back in place: the product then holds [rotated q; rotated k; v].
            qk = y[:, : heads + kvh]
            torch.add(qk * cos, qk.roll(hd // 2, -1) * sin, out=qk)
            kv = self.kv[i]
            kv[:, :, L] = y[:, heads:]
            keys, values = kv[:, :kvh, : L + 1], kv[:, kvh:, : L + 1]
            q = y[:, :heads].view(n, kvh, groups, hd) if padded and groups > 1 else y[:, :heads].unsqueeze(2)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask if padded else None, scale=layer.self_attn.scaling,
                enable_gqa=groups > 1 and not padded,
            )  # fmt: skip
            # [n, heads or kv heads, 1 or groups, hd] holds the heads in transformers' order: one query position
            h = residual + product(out.reshape(n, 1, heads * hd).contiguous(), o_w, None)
            residual = h
            gu = product(layer.post_attention_layernorm(h), gate_up, None)
            h = residual + product(layer.mlp.act_fn(gu[..., :inter]) * gu[..., inter:], down, None)
        self.length = L + 1
        return self.model.lm_head(lm.norm(h))
