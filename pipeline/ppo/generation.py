"""Rollout engines: what samples PPO's responses.

An engine has two methods, which is all the trainer calls:

- ``sync()``: take the policy's weights as the last optimizer step left them (before every rollout);
- ``generate(input_ids, attention_mask, **kwargs)``: ``transformers``' ``generate`` contract, left-padded
  prompts in, prompt + sampled tokens out; the trainer passes the sampling logits processor
  (``pipeline/sampling.py``), which also records the log-prob of every drawn token.

``MergedPolicy`` (below) and ``PeftSampler`` are the two engines here. ``MergedPolicy`` decodes with
``pipeline/decoding.py``, which drops rows from the batch as they finish; ``PeftSampler`` (sharded weights,
adapters that do not merge) keeps ``generate``. A GPU inference engine (vLLM) would be a
third behind the same two methods; docs/design.md has the plan.

Sampling from a merged copy of the LoRA policy:

Sampling through PEFT's unmerged LoRA layers adds two small matmuls (and, under autocast, casts)
to every adapted linear layer at every decoding step, a large share of each step for a small
model; a plain model holding ``W + B A * scaling`` samples faster
(``benchmarks/bench_ppo_generation.py``; figures in ``docs/benchmarks.md``). The same reason is
why OpenRLHF and verl sample with a separate inference engine whose weights are synced from the
trainer each step.

``MergedPolicy`` keeps such a plain copy beside the training module (one more set of base weights)
and re-merges the adapted weights before each rollout; the weights that LoRA does not touch are
frozen and copied once. Merging in place in the training module is not an option: the base weights
are also the reference policy, and ``merge`` followed by ``unmerge`` does not round-trip in bf16.

Under bf16 (and wherever ``--rollout_logprobs`` resolves to ``forward``) the copy only samples tokens: the
log-probs PPO uses are recomputed by a policy forward, so a rounding difference between merged and unmerged
weights makes the rollout off-policy by that rounding only (the PPO ratio absorbs it). In fp32 the copy's own
log-probs of its draws serve as the old policy's (``--rollout_logprobs sampler``): they agree with the training
forward's to rounding, which ``val/sampler_token_prob_error`` checks every iteration.

Sharded training (DeepSpeed ZeRO-3, FSDP) holds only a shard of each weight per process; there,
and for adapter types other than plain LoRA, sampling goes through the PEFT model as before.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline import fast_decode
from pipeline.modeling import contiguous_head
from pipeline.packed_linear import pack_linears


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """``{name in the plain model: LoRA layer}`` for every LoRA-wrapped module of ``peft_model``."""
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in peft_model.get_base_model().named_modules() if isinstance(mod, LoraLayer)}


def sharded_weights(accelerator) -> str | None:
    """Which sharding holds only a part of each weight per process (FSDP, DeepSpeed ZeRO-3), or None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def unsupported_reason(peft_model: nn.Module, accelerator=None) -> str | None:
    """Why a merged copy cannot stand in for ``peft_model`` here, or None when it can."""
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear

    sharding = sharded_weights(accelerator) if accelerator is not None else None
    if sharding:
        return f"{sharding} shards the weights"
    layers = lora_layers(peft_model)
    if not layers:
        return "the policy has no LoRA layers"
    for name, mod in layers.items():
        if type(mod) not in (LoraLinear, LoraEmbedding):
            return f"{name} is a {type(mod).__name__} adapter layer (only LoRA Linear/Embedding merge here)"
        if any(mod.use_dora.get(a, False) for a in mod.active_adapters):
            return f"{name} uses DoRA"
    return None


def _plain_name(key: str) -> str:
    """State-dict key of the PEFT-wrapped base model -> the same weight in a plain model."""
    return key.replace(".base_layer.", ".")


def exact_scale(scaling) -> bool:
    """Whether multiplying by a LoRA ``scaling`` is exact wherever it is applied: a power of two of at least 1
    (the default ``lora_alpha = 2 r`` gives 2). Such a factor only moves the exponent, so it commutes with every
    product, sum and rounding (short of an overflow, which the unscaled order overflows on as well)."""
    return isinstance(scaling, (int, float)) and scaling >= 1 and math.frexp(scaling)[0] == 0.5


def _delta_weight(layer, adapter: str) -> torch.Tensor:
    """PEFT's ``layer.get_delta_weight(adapter)``, ``(B @ A) * scaling``, as ``(B * scaling) @ A`` where that
    gives the same bits: a plain LoRA ``Linear`` with float32 factors and a scaling that is a power of two at
    least 1 (``exact_scale``), which commutes with every product, sum and rounding of the product (bf16 under
    autocast, as the rollout syncs, or float32). The pass that scales the ``[out, in]`` product becomes one over
    the ``[out, r]`` factor
    (tests/ppo/test_generation.py compares every weight with ``get_delta_weight``'s)."""
    from peft.tuners.lora import Linear as LoraLinear

    scaling = layer.scaling.get(adapter) if type(layer) is LoraLinear and adapter in layer.lora_A else None
    if scaling is None or layer.fan_in_fan_out or not exact_scale(scaling):
        return layer.get_delta_weight(adapter)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if A.dtype != torch.float32 or B.dtype != torch.float32:
        return layer.get_delta_weight(adapter)
    return (B * scaling) @ A


class PeftSampler:
    """Samples through the PEFT policy itself: its adapter is always current, so ``sync`` has nothing to do."""

    def __init__(self, peft_model: nn.Module):
        self.model = peft_model

    def sync(self) -> None:
        pass

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


class MergedPolicy:
    """A plain transformers model that samples like ``peft_model`` with its active adapter.

    ``sync()`` writes ``W + delta`` into every adapted weight; call it after each optimizer update
    (the rollout does, before generating).
    """

    def __init__(self, peft_model: nn.Module):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        base = peft_model.get_base_model()
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
        plain = {
            _plain_name(k): v.detach().clone()
            for k, v in base.state_dict().items()
            if "lora_" not in k and "modules_to_save" not in k and "original_module" not in k
        }
        missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
        # The tied output embedding is the only weight a plain state dict may leave out.
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or any(k not in tied for k in missing):
            raise RuntimeError(f"merged policy copy: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        # Buffers (rotary frequencies) were built on the CPU outside ``init_empty_weights``: follow the weights.
        model.to(next(base.parameters()).device)
        model.generation_config = base.generation_config
        contiguous_head(model)
        model.requires_grad_(False)
        pack_linears(model)  # sync's copy_ bumps each weight's version: the next call repacks it
        if fast_decode.unsupported_reason(model) is None:  # decoding will stack q/k/v and gate/up: stack in place
            fast_decode.stack_weights(model)
        self.model = model.eval()
        self.layers = lora_layers(peft_model)

    @torch.no_grad()
    def sync(self) -> None:
        for name, layer in self.layers.items():
            target = self.model.get_submodule(name).weight
            base = layer.get_base_layer().weight
            deltas = [_delta_weight(layer, a) for a in layer.active_adapters
                      if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]  # fmt: skip
            if len(deltas) == 1 and base.dtype == deltas[0].dtype == target.dtype:
                # One pass: an elementwise add of two bf16 tensors computes in float32 and rounds once to bf16,
                # the bits of the float32 sum below rounded by ``copy_`` (tests/ppo/test_generation.py).
                torch.add(base, deltas[0], out=target)
                continue
            # In float32: a bf16 base weight plus a float32 delta promotes exactly as ``base.float()`` would, and
            # ``copy_`` rounds to the target's dtype as ``.to`` does, with two fewer passes over every weight.
            w = base
            for delta in deltas:
                w = w + delta.float()
            target.copy_(w)

    def generate(self, **kwargs):
        """Finished rows leave the batch (``pipeline/decoding.py``) unless the model's generation config asks for
        processors that loop does not apply."""
        from pipeline import decoding

        if decoding.can_compact(self.model) is None:
            return decoding.generate(self.model, **kwargs)
        return self.model.generate(**kwargs)
