"""The PPO trainer: rollout -> rewards -> GAE -> clipped updates, on Accelerate + PEFT.

Written for this project; the references read while writing it are TRL 1.12's
``trl.experimental.ppo`` trainer, CleanRL's ``ppo.py``, ``summarize_from_feedback_details``'s
``ppo.py`` and [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"
(https://arxiv.org/abs/2403.17031).

Tensor names: ``B`` local rollout batch, ``P`` padded prompt length, ``R`` response length.
Responses are right of the (left-padded) prompt; ``mask`` ``[B, R]`` is 1 on response tokens up to
and including the first EOS and 0 after (:func:`pipeline.sequences.response_mask`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline import artifacts as art
from pipeline.errors import PeerFailed, PipelineError
from pipeline.modeling import training_attention
from pipeline.ppo import checkpoint as ckpt
from pipeline.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_logprobs,
    token_prob_error,
    token_rewards,
    value_loss,
)
from pipeline.ppo.gae import compute_gae, grpo_advantages, reward_to_go, rloo_advantages
from pipeline.ppo.generation import exact_scale
from pipeline.sampling import InverseCDFSampler, sampling_kwargs
from pipeline.sequences import position_ids_from, response_mask

RewardFn = Callable[[list[list[dict]], list[str]], Tensor]  # (prompts, responses) -> scores [B] on the CPU


def token_values(
    seq_cls_model: nn.Module, input_ids: Tensor, attention_mask: Tensor, hidden: tuple[int, Tensor] | None = None
) -> Tensor:
    """Per-token values ``[B, L]`` float32 from a sequence-classification model: its score head on every position.

    ``seq_cls_model`` is the transformers model (inside PEFT, ``peft_model.get_base_model()``): LoRA
    layers are injected into it in place, and its ``score`` is PEFT's modules-to-save wrapper, so the
    active adapter (or none, under ``disable_adapter()``) applies.

    ``hidden=(k, states)``: the input hidden states ``[B, L, d]`` of decoder layer ``k``, computed before
    (``decoding.scoring_forward(capture=...)``); only layers ``k`` onwards run (``layers_from``).
    """
    backbone = getattr(seq_cls_model, seq_cls_model.base_model_prefix)
    kw = dict(attention_mask=attention_mask, position_ids=position_ids_from(attention_mask), use_cache=False)
    if hidden is None:
        out = backbone(input_ids=input_ids, **kw)
    else:
        with layers_from(backbone, hidden[0]):
            out = backbone(inputs_embeds=hidden[1], **kw)
    return seq_cls_model.score(out.last_hidden_state).squeeze(-1).float()


@contextmanager
def layers_from(backbone: nn.Module, k: int):
    """``backbone`` (a transformers decoder: ``layers`` run in order on its ``inputs_embeds``) with decoder layers
    ``k`` onwards only, for the duration: its forward then maps layer ``k``'s input hidden states to the final
    ones (the final norm included)."""
    layers = backbone.layers
    backbone.layers = nn.ModuleList(list(layers)[k:])
    try:
        yield backbone
    finally:
        backbone.layers = layers


# ``_train_forward`` splits a micro-batch into chunks only where they compute at least this share fewer tokens
# than one forward cut to its longest prompt and response: at the ppo_vs_trl sizes (2.6% fewer) two narrower
# forwards ran slower than one (docs/benchmarks.md, 2026-12-04 afternoon).
CHUNK_MIN_SAVING = 0.10


class PolicyAndValue(nn.Module):
    """One module holding both trained networks, so one optimizer and one ``accelerator.prepare``
    (DDP, DeepSpeed, FSDP) cover them. ``forward`` returns policy logits and per-token values."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy  # PeftModel (causal LM); reference = policy.disable_adapter()
        # PeftModel (seq-cls, reward = value.disable_adapter()), a plain seq-cls model, or None (critic-free)
        self.value = value
        self.value_from_layer = 0  # the first value layer with trained weights; set by the trainer that uses it

    def value_backbone(self) -> nn.Module:
        return self.value.get_base_model() if hasattr(self.value, "get_base_model") else self.value

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0, value_hidden: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``logits_to_keep=n``: policy logits of the last ``n`` positions only (0 = all), which skips
        the vocabulary projection of the prompt. Values are None without a value model. ``value_hidden``: the
        value model's hidden states entering layer ``value_from_layer`` (frozen layers below it), computed
        before; the value forward runs from that layer on."""
        values = self.values(input_ids, attention_mask, value_hidden)
        return self.policy_logits(input_ids, attention_mask, logits_to_keep), values

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0) -> Tensor:
        return self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            use_cache=False,
            logits_to_keep=logits_to_keep,
        ).logits

    def values(self, input_ids: Tensor, attention_mask: Tensor, hidden: Tensor | None = None) -> Tensor | None:
        """Per-token values ``[B, L]``, or None without a value model (``hidden``: see ``forward``)."""
        if self.value is None:
            return None
        start = None if hidden is None else (self.value_from_layer, hidden)
        return token_values(self.value_backbone(), input_ids, attention_mask, start)


@dataclass
class Rollout:
    """Everything one iteration's update needs (all on the local device, detached)."""

    query_response: Tensor  # [B, P+R] token ids (prompt left-padded, response right-padded)
    attention_mask: Tensor  # [B, P+R]
    context_length: int  # P
    mask: Tensor  # [B, R] bool
    logprobs: Tensor  # [B, R] behaviour-policy log-probs (temperature-scaled)
    values: Tensor  # [B, R]
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]
    stats: dict
    texts: list[tuple[str, str, float]]  # (prompt, response, score) for sample tables
    # [B, P+R, d]: the value model's hidden states entering its first trained layer (value_from_layer), or None
    value_hidden: Tensor | None = None


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process gets the same answer; no collective with one)."""
    if accelerator.num_processes == 1:
        return flag
    # accelerate's reduce knows only mean/sum/max ("min" silently sums).
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item() > 0


def stop_together(accelerator, error: PipelineError | None) -> None:
    """Raise ``error`` (a refusal found on this process) so that every process stops at once: the process that
    found it raises it (one line), every other one raises :class:`PeerFailed` (silent, exit 2). Without this a
    refusal on one process leaves the others in their next collective, which ends in a gloo/NCCL traceback."""
    failed_anywhere = any_process(accelerator, error is not None)
    if error is not None:
        raise error
    if failed_anywhere:
        raise PeerFailed("another process stopped with an error (above)")


class PhaseClock:
    """Wall seconds per phase of an iteration (``time/<phase>_s`` in the metrics). On an accelerator the device is
    synchronised at each phase boundary, so a phase is charged with its own kernels: a handful of syncs per
    iteration. On the CPU the work is synchronous and nothing extra runs."""

    def __init__(self, device: torch.device):
        module = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps ... (torch.cpu: a no-op)
        self._sync = getattr(module, "synchronize", None) if device.type != "cpu" else None
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        if self._sync:
            self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

    def take(self) -> dict[str, float]:
        """``{"time/<phase>_s": seconds}`` since the last call; starts afresh."""
        out, self.seconds = {f"time/{k}_s": v for k, v in self.seconds.items()}, {}
        return out


class NonFiniteGuard:
    """Skips an optimizer step whose loss or gradient norm is non-finite on any process, and stops the
    run (one-line error, nothing published) after more than ``max_in_a_row`` such steps in a row."""

    def __init__(self, accelerator, max_in_a_row: int):
        self.accelerator = accelerator
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def step_ok(self, loss: Tensor, grad_norm) -> bool:
        bad = not (torch.isfinite(loss.detach()).all() and math.isfinite(float(grad_norm)))
        if not any_process(self.accelerator, bad):  # every rank skips the same step
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.max_in_a_row:
            raise PipelineError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient; "
                "lower --learning_rate or --max_grad_norm, or check the reward model; no artifact was written"
            )
        return False

    def state_dict(self) -> list[int]:
        return [self.in_a_row, self.total]

    def load_state_dict(self, state: list[int]) -> None:
        self.in_a_row, self.total = state


# Per-minibatch update statistics, in the order of the preallocated buffer's last dimension.
UPDATE_STATS = (
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "val/ratio",
    "policy/entropy",
)
# Logged as iteration means under "<name>_avg".
AVERAGED = ("policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac")


def fuses_update(args, sizes) -> bool:
    """Whether the rollout's policy and value forwards can be the update's own forward: one epoch of one minibatch
    of one micro-batch means one optimizer step, taken on exactly the tensors the rollout scores with the weights
    it scores them with. The rollout then runs that forward once, with gradients, takes its log-probs and values
    detached, and the update backpropagates through it: two forwards fewer per iteration, the same arithmetic
    (the ratio is exactly 1 at that step, as it is when they are recomputed)."""
    return args.num_ppo_epochs == 1 and args.num_mini_batches == 1 and sizes.gradient_accumulation_steps == 1


def fused_adamw(accelerator, params: list[Tensor]) -> bool | None:
    """Whether AdamW runs PyTorch's fused kernel: one pass over each parameter's state per step instead of one per
    operation of the update (``benchmarks/bench_kernels.py adamw``, the demo policy's and value's adapters on 2
    CPU cores: 23.4 against 5.1 ms per step, docs/benchmarks.md 2026-12-05 afternoon). It
    rounds differently from the per-operation update (the same command: parameters 1.5e-8 apart after five
    steps), so it changes a run at the rounding level; PPO's multi-seed benchmark covers it (docs/results.md).
    Where parameters are not all float32 or bf16 on a CPU or CUDA device, or under DeepSpeed or FSDP (which shard
    the optimizer or its parameters their own way), None: PyTorch's default."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return None
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return True if params and ok else None


def lean_lora_layers(model: nn.Module, mixed_precision: str) -> list[nn.Module]:
    """The LoRA layers of ``model`` whose forward ``lean_lora_forwards`` may run leaner with the same bits, or none.

    PEFT casts each LoRA layer's input to its float32 factors' dtype (``x.to(float32)``), and under bf16
    autocast the factor's linear casts it straight back to bf16. Both are full copies of the layer's input, and
    their backward adds two more. Skipping them is exact where every forward runs under bf16 autocast
    (``mixed_precision`` ``"bf16"``), because a bf16 value survives float32 and back unchanged. LoRA dropout must
    be off, since dropout on the float32 copy scales in float32. The PPO policy's bf16 base feeds bf16 inputs,
    and both casts are skipped for it; a float32 base's inputs are float32, and nothing changes for it.
    ``tests/ppo/test_trainer.py`` compares the outputs and gradients bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if mixed_precision != "bf16":
        return []
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        if any(not isinstance(d, nn.Identity) for d in getattr(layer, "lora_dropout", {}).values()):
            return []
    return layers


def _lean_lora_forward(layer: nn.Module, peft_forward: Callable, x: Tensor, *args, **kwargs) -> Tensor:
    """PEFT's LoRA ``Linear.forward`` for the case ``lean_lora_forwards`` runs it in, the same bits: no input
    cast (``lean_lora_layers``), and a power-of-two scaling applied to the rank-``r`` factor's output rather
    than to the layer's: ``B(A(x) * s)`` for PEFT's ``B(A(x)) * s`` (``exact_scale``). The pass over the
    ``[tokens, out]`` output becomes one over ``[tokens, r]``, in the forward and again in the backward; a
    scaling of 1 costs no pass at all. Anything else (adapters disabled or merged, per-row adapters, DoRA and
    other variants, keyword arguments) runs PEFT's forward with its input cast off."""
    if args or kwargs or layer.disable_adapters or layer.merged or getattr(layer, "lora_variant", None):
        return peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x)
    dtype = result.dtype
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        h, scaling = layer.lora_A[name](x), layer.scaling[name]
        if not exact_scale(scaling):
            result = result + layer.lora_B[name](h) * scaling  # PEFT's order
            continue
        result = result + layer.lora_B[name](h if scaling == 1 else h * scaling)
    return result.to(dtype)


@contextmanager
def lean_lora_forwards(layers: list[nn.Module]):
    """Within it, ``layers`` (``lean_lora_layers``) take their input as it comes, and PEFT's plain LoRA
    ``Linear`` layers among them run ``_lean_lora_forward``; their setting after. PEFT's
    ``peft.helpers.disable_input_dtype_casting`` sets the same input-cast flag, but walks all of the model's
    modules (some 2,500 for the SmolLM2 policy) at each entry and exit, at every forward; this takes the layers
    found once."""
    from functools import partial

    from peft.tuners.lora import Linear as LoraLinear

    before = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    lean = [layer for layer in layers if type(layer) is LoraLinear and "forward" not in vars(layer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    for layer in lean:
        layer.forward = partial(_lean_lora_forward, layer, layer.forward)
    try:
        yield
    finally:
        for layer in lean:
            del layer.forward
        for layer, was in zip(layers, before):
            layer.cast_input_dtype_enabled = was


def print_samples(texts: list[tuple[str, str, float]], iteration: int, judge=None, n: int = 4) -> None:
    """A rich table of the first ``n`` (prompt, response, score) rows, with the gold judge's score if given."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"PPO samples, iteration {iteration}", show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=2)
    table.add_column("response", overflow="fold", ratio=3)
    table.add_column("RM score", justify="right")
    if judge is not None:
        table.add_column("gold", justify="right")
    for prompt, response, score in texts[:n]:
        row = [prompt, response, f"{score:.3f}"]
        if judge is not None:
            row.append(f"{judge(prompt, response):.2f}")
        table.add_row(*row)
    Console().print(table)


class PPOTrainer:
    """Owns a PPO run: rollouts, updates, the non-finite guard, checkpoints and resume, metrics, and
    publishing ``<artifact_dir>/ppo``. Built by ``pipeline/stage_ppo.py``; :meth:`train` is the loop.

    Args:
        args: ``PPOArguments``. sizes: the derived batch sizes (``stage_ppo.Sizes``).
        model: the unprepared ``PolicyAndValue``; the optimizer is built and both are prepared here.
        reward_fn: ``(prompts, responses) -> Tensor [B]``. prompts: the usable prompts (message lists).
        layout: the artifact layout. config, inputs: what the manifest records (and fingerprints).
        policy_path: the start policy, into which the published adapter is merged.
        judge: the embedded task's gold judge, logged beside the reward (never used as reward), or None.
        models: the model paths the manifest records. force: discard an interrupted run rather than resume it.
    """

    def __init__(
        self,
        args,
        sizes,
        accelerator,
        model: PolicyAndValue,
        tokenizer,
        reward_fn: RewardFn,
        prompts: list[list[dict]],
        layout: art.Layout,
        config: dict,
        inputs: dict,
        policy_path: str,
        judge: Callable[[str, str], float] | None = None,
        models: dict | None = None,
        force: bool = False,
    ):
        from transformers import get_scheduler

        self.args, self.sizes, self.accelerator = args, sizes, accelerator
        self.tokenizer, self.reward_fn, self.prompts, self.judge = tokenizer, reward_fn, prompts, judge
        self.layout, self.config, self.inputs, self.policy_path = layout, config, inputs, policy_path
        self.models = models or {}
        self.force = force  # discard an interrupted run instead of continuing it
        self.fingerprint = art.fingerprint(config, inputs)
        trained = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trained, lr=args.learning_rate, eps=1e-5, fused=fused_adamw(accelerator, trained)
        )
        self.scheduler = get_scheduler(
            args.lr_scheduler_type, self.optimizer, num_warmup_steps=0, num_training_steps=args.num_iterations
        )
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.kl_ctl = (
            AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
            if args.target_kl
            else FixedKLController(args.kl_coef)
        )
        self.score_moments = RunningMoments()
        self.guard = NonFiniteGuard(accelerator, args.max_nonfinite_steps)
        self.sampler = self._sampler()
        self.clock = PhaseClock(accelerator.device)
        self.fused = self.can_fuse()
        # The rollout's policy log-probs and entropy from the sampler (no policy forward; --rollout_logprobs).
        # Fused, they come from the update's own forward at no cost.
        self.sampler_logprobs = args.rollout_logprobs == "sampler" and not self.fused
        self.chunk_tokens = self.update_chunk_tokens()
        self.unwrapped.value_from_layer = self.frozen_value_layers()
        # The LoRA layers whose forwards run leaner with the same bits (lean_lora_layers).
        self.lean_lora = lean_lora_layers(self.unwrapped, accelerator.mixed_precision)
        # The fused forward, kept for the update: (log-probs, entropies, values or None).
        self._graph: tuple[Tensor, Tensor, Tensor | None] | None = None
        n_minibatches = args.num_ppo_epochs * args.num_mini_batches
        # [minibatch, micro-batch, statistic], filled during the update and reduced once per iteration.
        self.minibatch_stats = torch.zeros(n_minibatches, sizes.gradient_accumulation_steps, len(UPDATE_STATS),
                                           dtype=torch.float64, device=accelerator.device)  # fmt: skip
        self.grad_norms = torch.zeros(n_minibatches, dtype=torch.float64, device=accelerator.device)
        self.iteration, self.cursor, self.history = 0, 0, []

    @property
    def value_from_layer(self) -> int:
        """The value model's first trained layer where the update starts from the rollout's hidden states
        (``frozen_value_layers``), else 0; the model holds it, as its forward uses it."""
        return self.unwrapped.value_from_layer

    def can_fuse(self) -> bool:
        """Whether the rollout's policy and value forwards can be the update's own forward (``fuses_update``)."""
        return fuses_update(self.args, self.sizes)

    def frozen_value_layers(self) -> int:
        """How many bottom decoder layers of the value model hold no trained weight (the value adapter sits on the
        top ``--value_lora_layers``), where the update may start its value forward from their output as the
        rollout's value forward computed it (``Rollout.value_hidden``) instead of running them again: on one CPU
        process (``modeling.one_cpu_process``), with the update's forward separate from the rollout's, for a decoder
        value model with a score head, one kind of attention layer (``config.layer_types``: a cut layer list
        would give layer ``k`` the mask of layer 0) and no dropout in training (the bottom layers would draw
        masks in the update, not in the rollout). 0 where that does not apply."""
        from pipeline.decoding import has_active_dropout, score_head_run
        from pipeline.modeling import one_cpu_process

        net = self.unwrapped
        if self.fused or not one_cpu_process(self.accelerator) or net.value is None:
            return 0
        if not hasattr(net.value, "get_base_model"):  # trained whole
            return 0
        run = score_head_run(net.value_backbone())
        backbone = getattr(run.model, run.model.base_model_prefix, None) if run is not None else None
        layers = getattr(backbone, "layers", None)
        if (
            not isinstance(layers, nn.ModuleList)
            or len(set(getattr(run.model.config, "layer_types", None) or [0])) > 1
        ):
            return 0
        if any(p.requires_grad for p in backbone.get_input_embeddings().parameters()):
            return 0
        was_training = net.value.training
        dropout = has_active_dropout(net.value.train())
        net.value.train(was_training)
        if dropout:
            return 0
        trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
        return trained[0] if trained else 0

    def update_chunk_tokens(self) -> int | None:
        """Tokens per length-sorted chunk of the update's forward (``_train_forward``; ``--update_chunk_tokens``),
        or None for one forward. Chunks only on one CPU process: there a padded position costs as much as a real
        one, while DDP, FSDP and DeepSpeed expect one forward of the wrapped model per backward, and on
        accelerators the padding is cheap next to the launches more, smaller forwards add."""
        from pipeline.modeling import one_cpu_process

        return (self.args.update_chunk_tokens or None) if one_cpu_process(self.accelerator) else None

    def update_plan(self, attention_mask: Tensor, P: int) -> list[tuple[list[int], int, int]] | None:
        """How ``_train_forward`` runs a micro-batch: ``(rows, prompt columns, response columns)`` per forward,
        or None for one padded forward (no ``chunk_tokens``). Length-sorted chunks of about ``chunk_tokens``
        (``decoding.length_chunks``) where they compute at least ``CHUNK_MIN_SAVING`` fewer tokens than one
        forward cut to the micro-batch's longest prompt and response; else that one forward, rows in order."""
        from pipeline.decoding import length_chunks

        if not self.chunk_tokens:
            return None
        mask = attention_mask.long()
        own, answered = mask[:, :P].sum(1), mask[:, P:].sum(1)
        chunks = list(length_chunks(own, answered, self.chunk_tokens))
        whole = (list(range(len(own))), int(own.max()), int(answered.max()))
        chunked = sum(len(rows) * (w + rc) for rows, w, rc in chunks)
        if len(chunks) < 2 or chunked > (1 - CHUNK_MIN_SAVING) * len(own) * (whole[1] + whole[2]):
            return [whole]  # narrower forwards cost more per token: split only where it saves enough
        return chunks

    def _train_forward(self, query_response: Tensor, attention_mask: Tensor, P: int, value_hidden=None) -> tuple:
        """The update's forward, with gradients: ``(log-probs [B, R] of the response tokens (temperature-scaled),
        their entropies [B, R] (no gradient), values [B, P+R] or None)``, as one ``self.model`` forward over the
        batch gives them (``core.token_logprobs``: the vocabulary-sized logits are never scaled, padded or
        gathered whole).

        With ``chunk_tokens`` (one CPU process) the forward is cut to the micro-batch's own longest prompt and
        response, or, where that saves at least ``CHUNK_MIN_SAVING`` of the tokens, the rows run as length-sorted
        chunks of about ``chunk_tokens`` tokens, each cut to its own longest prompt and response
        (``update_plan``). The outputs go back in row order, zeros where every row of a chunk is
        padding. A row's real tokens see the same tokens, positions and mask as in one forward, so the loss and
        its gradients (one backward over all chunks) are those of one forward up to rounding; the padding the
        batch's longest prompt and response impose on every row is not computed. The LoRA layers run
        leaner where that gives the same bits (``lean_lora_forwards``)."""
        with lean_lora_forwards(self.lean_lora):
            R = query_response.shape[1] - P
            temperature = self.args.temperature
            chunks = self.update_plan(attention_mask, P)
            if chunks is None:
                logits, values = self.model(query_response, attention_mask, R + 1, value_hidden)
                return (*token_logprobs(logits, query_response[:, P:], temperature), values)
            pieces_lp, pieces_ent, pieces_v, order = [], [], [], []
            for rows, w, rc in chunks:
                idx = torch.tensor(rows, device=query_response.device)
                ids, am = query_response[idx, P - w : P + rc], attention_mask[idx, P - w : P + rc]
                vh = None if value_hidden is None else value_hidden[idx, P - w : P + rc]
                logits, values = self.model(ids, am, logits_to_keep=rc + 1, value_hidden=vh)
                lp, ent = token_logprobs(logits, ids[:, w:], temperature)
                pieces_lp.append(nn.functional.pad(lp, (0, R - rc)))
                pieces_ent.append(nn.functional.pad(ent, (0, R - rc)))
                if values is not None:
                    pieces_v.append(nn.functional.pad(values, (P - w, R - rc)))
                order += rows
            if len(chunks) == 1:  # the rows in order (update_plan)
                return pieces_lp[0], pieces_ent[0], (pieces_v[0] if pieces_v else None)
            back = torch.argsort(torch.tensor(order, device=query_response.device))
            lp, ent = torch.cat(pieces_lp)[back], torch.cat(pieces_ent)[back]
            return lp, ent, (torch.cat(pieces_v)[back] if pieces_v else None)

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def _sampler(self):
        """The rollout engine (``pipeline/ppo/generation.py``): a merged copy of the policy, or the PEFT policy
        itself where a copy cannot stand in or ``--merged_generation false``."""
        from pipeline.ppo.generation import MergedPolicy, PeftSampler, unsupported_reason

        policy = self.unwrapped.policy
        if not self.args.merged_generation:
            return PeftSampler(policy)
        reason = unsupported_reason(policy, self.accelerator)
        if reason is None:
            return MergedPolicy(policy)
        self.accelerator.print(f"ppo: sampling through the PEFT model ({reason})")
        return PeftSampler(policy)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run (or resume) the iterations; publish ``ppo/`` when the last one is done."""
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        self._start()
        stop_at = args.num_iterations
        if args.stop_after_iterations is not None:
            stop_at = min(stop_at, self.iteration + args.stop_after_iterations)
        bar = tqdm(range(self.iteration, stop_at), initial=self.iteration, total=args.num_iterations,
                   desc="ppo", disable=not acc.is_main_process)  # fmt: skip
        for iteration in bar:
            t0 = time.perf_counter()
            k = args.num_samples_per_prompt
            prompts = [p for p in self.prompts_for(self.cursor) for _ in range(k)]  # each prompt's k samples adjacent
            self.cursor += self.sizes.batch_size
            ro = self.rollout(prompts)  # steps 1-5: generate, score, reward, advantages
            t_rollout = time.perf_counter() - t0
            with self.clock("update"):
                update_stats = self.update(ro)  # step 6: PPO epochs over minibatches
            self.kl_ctl.update(ro.stats["objective/kl"], self.sizes.episodes)
            row = {"iteration": iteration + 1, "episode": self.cursor * k, **ro.stats, **update_stats,
                   **self.clock.take(), "time/rollout_s": t_rollout,
                   "time/iteration_s": time.perf_counter() - t0}  # fmt: skip
            self.log(row, ro, bar)
            self.iteration = iteration + 1
            if self.iteration % args.save_every == 0 or self.iteration == stop_at:
                self.save_checkpoint()
        bar.close()
        if stop_at < args.num_iterations:
            acc.print(f"ppo: stopped after iteration {stop_at} of {args.num_iterations}; "
                      "re-run the same command to continue")  # fmt: skip
            return {"stopped_at": stop_at, "history": self.history}
        self.publish()
        return {"history": self.history}

    def prompts_for(self, cursor: int) -> list[list[dict]]:
        """This process's prompts for the iteration starting at global episode ``cursor``: every epoch
        over the prompts is a fresh seeded shuffle, cut into whole iterations."""
        g = self.sizes.batch_size
        epoch, offset = divmod(cursor, len(self.prompts) - len(self.prompts) % g)
        gen = torch.Generator().manual_seed(self.args.seed + epoch)
        perm = torch.randperm(len(self.prompts), generator=gen).tolist()
        local = self.args.rollout_batch_size
        idx = perm[offset : offset + g][self.accelerator.process_index * local :][:local]
        return [self.prompts[i] for i in idx]

    # ------------------------------------------------------------------ rollout
    def rollout(self, prompts: list[list[dict]]) -> Rollout:
        # Every rollout forward (generation, policy, reference, value, reward) runs under the same
        # autocast as the update's forward, so policy and reference differ only by the adapter.
        with torch.no_grad(), self.accelerator.autocast():
            return self._rollout(prompts)

    def _rollout(self, prompts: list[list[dict]]) -> Rollout:
        args, tok, device = self.args, self.tokenizer, self.accelerator.device
        self.unwrapped.eval()
        # 1. Generate a response per prompt (sampled at the temperature; stops at EOS; capped at R tokens).
        with self.clock("generate"):
            query_response, attention_mask, P, mask, has_eos, drawn = self._generate(prompts)
        responses = query_response[:, P:]
        # 2. One forward each: policy log-probs (and entropy), values, reference log-probs (adapter off). With
        # --rollout_logprobs sampler the policy's come from the sampler instead (``drawn``).
        with self._attention(query_response.shape[1]):
            logprobs, ref_logprobs, values, entropy, value_hidden = self._forward(
                query_response, attention_mask, responses, drawn
            )

        # 3. Score the decoded responses with the reward model (re-encoded by its own tokenizer).
        response_texts = tok.batch_decode(
            responses.masked_fill(responses == tok.eos_token_id, tok.pad_token_id), skip_special_tokens=True
        )
        try:  # rule functions run on each process's own rollouts: a refusal may come from one process only
            with self.clock("reward"):
                raw_scores, failed = self.reward_fn(prompts, response_texts).to(device).float(), None
        except PipelineError as e:
            raw_scores, failed = None, e
        stop_together(self.accelerator, failed)
        all_raw = self.accelerator.gather(raw_scores)
        scores = raw_scores
        if args.normalize_scores:
            self.score_moments.update(all_raw)  # the same statistics on every rank
            scores = (raw_scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        if args.score_clip is not None:
            scores = scores.clamp(-args.score_clip, args.score_clip)
        scores = torch.where(has_eos, scores, scores - args.missing_eos_penalty)

        # 4. Per-token rewards: -beta * KL on every response token, plus the score on the last one.
        kl = kl_estimate(logprobs, ref_logprobs, args.kl_estimator)  # [B, R]
        rewards = token_rewards(kl, scores, mask, self.kl_ctl.value)

        # 5. Advantages over response tokens: GAE against the value model (whitened), or critic-free.
        advantages, returns = self._advantages(rewards, values, mask)

        kl_seq = torch.where(mask, kl, 0.0).sum(1)  # [B] sequence KL (nats)
        non_score = rewards.sum(1) - torch.where(mask.sum(1) > 0, scores, 0.0)
        g = self.accelerator.gather_for_metrics
        stats = {
            "objective/kl": g(kl_seq).mean().item(),
            "objective/entropy": g(torch.where(mask, entropy, 0.0).sum(1)).mean().item(),
            "objective/non_score_reward": g(non_score).mean().item(),
            "objective/rlhf_reward": g(scores + non_score).mean().item(),
            "objective/scores": all_raw.mean().item(),
            "objective/scores_std": all_raw.std().item() if all_raw.numel() > 1 else 0.0,
            "objective/kl_coef": self.kl_ctl.value,
            "val/eos_rate": g(has_eos.float()).mean().item(),
            "val/response_length": g(mask.sum(1).float()).mean().item(),
        }
        if not self.sampler_logprobs:
            # The sampler's own log-probs against the training forward's, on the sampled tokens (1 = they agree).
            # With the sampler's log-probs the update measures it on its first minibatch (see update).
            prob_error = token_prob_error(drawn[0], logprobs, mask)
            stats["val/sampler_token_prob_error"] = g(prob_error.unsqueeze(0)).mean().item()
        parts = getattr(self.reward_fn, "last_components", {})
        if parts.get("members") is not None and len(parts["members"]) > 1:  # ensemble disagreement
            stats["objective/ensemble_std"] = g(parts["members"].std(0).to(device)).mean().item()
        for i, row in enumerate(parts.get("rules", ())):  # each rule reward's mean, unweighted
            stats[f"objective/rule_{i}"] = g(row.to(device)).mean().item()
        if self.unwrapped.value is not None:
            stats["val/explained_variance"] = explained_variance(g(values), g(returns), g(mask)).item()
        texts = [(p[-1]["content"], r, float(s)) for p, r, s in zip(prompts, response_texts, raw_scores.cpu())]
        return Rollout(query_response, attention_mask, P, mask, logprobs, values, advantages, returns, stats, texts,
                       value_hidden)  # fmt: skip

    def _advantages(self, rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(advantages, returns)`` ``[B, R]`` by ``--advantage_estimator``. The KL penalty is in ``rewards``
        for every estimator. Critic-free returns are zeros (no value loss)."""
        args = self.args
        if args.advantage_estimator == "gae":
            advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
            return masked_whiten(advantages, mask), returns
        if args.advantage_estimator == "reinforce_pp":
            # Token returns normalised over the whole batch, every process included.
            g = self.accelerator.gather_for_metrics
            returns = reward_to_go(rewards, mask, args.gamma)
            all_returns, all_mask = g(returns), g(mask)
            mean, var = masked_mean(all_returns, all_mask), masked_var(all_returns, all_mask)
            advantages = torch.where(mask, (returns - mean) * torch.rsqrt(var + 1e-8), 0.0)
        else:
            sequence = rewards.sum(1)  # score - beta * sum_t KL_t
            estimator = rloo_advantages if args.advantage_estimator == "rloo" else grpo_advantages
            per_sequence = estimator(sequence, args.num_samples_per_prompt)
            advantages = torch.where(mask, per_sequence.unsqueeze(1), 0.0)
        return advantages, torch.zeros_like(advantages)

    def _generate(self, prompts: list[list[dict]]) -> tuple[Tensor, Tensor, int, Tensor, Tensor, tuple]:
        """``(query_response [B, P+R], attention_mask [B, P+R], P, mask [B, R], has_eos [B], (sampler_logprobs
        [B, R], sampler_entropy [B, R] or None))``: left-padded prompts, then sampled responses cut at their first
        EOS and right-padded with the pad token, the log-prob of each sampled token under the distribution it was
        drawn from, and (with the sampler's log-probs in use) that distribution's entropy; 0 past a row's end."""
        args, tok = self.args, self.tokenizer
        chunk, R = args.local_rollout_forward_batch_size, args.response_length
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
        enc = enc.to(self.accelerator.device)
        P = enc["input_ids"].shape[1]
        draw = InverseCDFSampler(record_logprobs=True, record_entropy=self.sampler_logprobs)
        gen_kwargs = dict(
            **sampling_kwargs(args.temperature, args.top_k, args.top_p, draw),
            max_new_tokens=R,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        sampler = self.sampler
        sampler.sync()  # the engine takes the adapter as the last update left it
        outs, drawn, entropies = [], [], []
        for i in range(0, len(prompts), chunk):
            outs.append(
                sampler.generate(
                    input_ids=enc["input_ids"][i : i + chunk],
                    attention_mask=enc["attention_mask"][i : i + chunk],
                    **gen_kwargs,
                )[:, P:]
            )
            drawn.append(draw.take_logprobs())
            if self.sampler_logprobs:
                entropies.append(draw.take_entropy())
        responses = torch.cat([nn.functional.pad(o, (0, R - o.shape[1]), value=tok.pad_token_id) for o in outs])
        sampler_logprobs = torch.cat([nn.functional.pad(d, (0, R - d.shape[1])) for d in drawn])
        sampler_entropy = (
            torch.cat([nn.functional.pad(e, (0, R - e.shape[1])) for e in entropies]) if entropies else None
        )
        # The response ends at its first EOS; everything after it is padding.
        mask, has_eos = response_mask(responses, tok.eos_token_id)
        responses = responses.masked_fill(~mask, tok.pad_token_id)
        query_response = torch.cat([enc["input_ids"], responses], 1)
        attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)
        if self.sampler_logprobs:  # past a row's end: 0, as a forward's values there are never read
            sampler_logprobs, sampler_entropy = (
                sampler_logprobs.masked_fill(~mask, 0.0),
                sampler_entropy.masked_fill(~mask, 0.0),
            )
        return query_response, attention_mask, P, mask, has_eos, (sampler_logprobs, sampler_entropy)

    def _attention(self, tokens: int):
        """The attention kernel of the rollout's scoring forwards. Fused, they include the update's own forward:
        ``training_attention`` (the math kernel on a CPU under bf16, whose backward is the faster there), for
        the reference and value forwards too, so that the log-probs compared come from one kernel. Separate,
        they run without gradients, where flash is the faster (no change), and the update's own forwards take
        ``training_attention`` (``update``). Under bf16 the two kernels round differently, as the rollout's
        prefix-sharing shapes already do; in fp32 nothing changes."""
        if not self.fused:
            return nullcontext()
        return training_attention(self.accelerator.device, self.accelerator.mixed_precision, tokens, grouped=True)

    def _forward(self, query_response: Tensor, attention_mask: Tensor, responses: Tensor, drawn: tuple) -> tuple:
        """``(logprobs, ref_logprobs, values, entropy)``, each ``[B, R]``, in chunks of the rollout forward batch;
        the policy's log-probs and entropy are the sampler's (``drawn``) with ``self.sampler_logprobs``. Then the
        value model's hidden states entering ``value_from_layer`` ``[B, P+R, d]`` for the update, or None."""
        args, net = self.args, self.unwrapped
        R = responses.shape[1]
        P = query_response.shape[1] - R
        step = args.local_rollout_forward_batch_size
        chunks = [slice(i, i + step) for i in range(0, len(query_response), step)]
        if self.fused:  # the update's forward, run now on the whole batch (see can_fuse)
            with self.clock("policy_value_forward"), torch.enable_grad():
                self.model.train()
                lp, entropy, v = self._train_forward(query_response, attention_mask, P)
                self.unwrapped.eval()
            self._graph = (lp, entropy, v)
            logprobs = lp.detach()
            values = v.detach()[:, P - 1 : -1] if v is not None else torch.zeros_like(logprobs)
            value_hidden = None
        else:  # without gradients: the shared prompt prefix once, rows in length-sorted chunks (scoring_forward)
            logprobs, values, entropies, hidden = [], [], [], []
            for c in chunks:
                qr, am = query_response[c], attention_mask[c]
                if self.sampler_logprobs:
                    logprobs.append(drawn[0][c])
                    entropies.append(drawn[1][c])
                else:
                    with self.clock("policy_forward"):
                        lp, ent = token_logprobs(self._scored(qr, am, P, "policy"), responses[c], args.temperature)
                        logprobs.append(lp)
                        entropies.append(ent)
                if net.value is None:  # critic-free
                    values.append(torch.zeros_like(logprobs[-1]))
                else:
                    with self.clock("value_forward"):
                        v = self._scored(qr, am, P, "value", capture=bool(self.value_from_layer))
                        if self.value_from_layer:  # and the frozen layers' output, for the update
                            v, h = v
                            hidden.append(h)
                        values.append(v[:, :-1])
            logprobs, values, entropy = torch.cat(logprobs), torch.cat(values), torch.cat(entropies)
            value_hidden = torch.cat(hidden) if hidden else None
        ref_logprobs = []
        for c in chunks:
            with self.clock("reference_forward"), net.policy.disable_adapter():  # the reference is the SFT model
                logits = self._scored(query_response[c], attention_mask[c], P, "policy")
                ref_logprobs.append(token_logprobs(logits, responses[c], args.temperature, entropy=False)[0])
        return logprobs, torch.cat(ref_logprobs), values, entropy, value_hidden

    def _scored(self, query_response: Tensor, attention_mask: Tensor, P: int, which: str, capture: bool = False):
        """Without gradients, the policy's logits (``which="policy"``; the reference under ``disable_adapter``)
        or the value model's per-token values at the last ``R + 1`` positions, through
        ``decoding.scoring_forward``: the same numbers as one padded forward up to rounding, with less work.
        ``capture`` (the value model, with ``value_from_layer``): ``(values, the hidden states entering that
        layer)``. The LoRA layers run leaner where that gives the same bits (``lean_lora_forwards``)."""
        from pipeline.decoding import causal_lm_run, score_head_run, scoring_forward

        with lean_lora_forwards(self.lean_lora):
            net, keep = self.unwrapped, query_response.shape[1] - P + 1
            if which == "policy":
                model, run = net.policy.get_base_model(), causal_lm_run(net.policy)
            else:
                run = score_head_run(net.value_backbone())
                if run is None:  # not a decoder with a score head: the per-token values of one forward
                    return net.values(query_response, attention_mask)[:, P - 1 :]
                model = run.model
                if capture:
                    layer = getattr(model, model.base_model_prefix).layers[self.value_from_layer]
                    return scoring_forward(run, model, query_response, attention_mask, P, keep, capture=layer)
            return scoring_forward(run, model, query_response, attention_mask, P, keep)

    # ------------------------------------------------------------------ update
    def update(self, ro: Rollout) -> dict:
        """6. ``num_ppo_epochs`` passes over ``num_mini_batches`` shuffled minibatches, one optimizer step
        each (gradient accumulation over micro-batches); returns the iteration's mean statistics (and, with the
        sampler's log-probs, the sampler's token-probability error on the first minibatch)."""
        args, acc = self.args, self.accelerator
        self.model.train()
        B, P = ro.mask.shape[0], ro.context_length
        mb_size, micro_size = self.sizes.local_mini_batch_size, args.per_device_train_batch_size
        stats, mb = self.minibatch_stats.zero_(), 0
        prob_error = torch.zeros(2, dtype=torch.float64, device=acc.device)  # first minibatch: sum, tokens
        for _epoch in range(args.num_ppo_epochs):
            order = torch.randperm(B, device=ro.mask.device)
            for mb_start in range(0, B, mb_size):
                mb_inds = order[mb_start : mb_start + mb_size]
                for micro, micro_start in enumerate(range(0, mb_size, micro_size)):
                    inds = mb_inds[micro_start : micro_start + micro_size]
                    mask = ro.mask[inds]
                    with acc.accumulate(self.model):
                        if self._graph is not None:  # the rollout ran this forward (see can_fuse)
                            new_logprobs, token_entropy, values = (
                                t[inds] if t is not None else None for t in self._graph
                            )
                            self._graph = None
                        else:
                            vh = None if ro.value_hidden is None else ro.value_hidden[inds]
                            with training_attention(
                                acc.device, acc.mixed_precision, ro.query_response.shape[1], grouped=True
                            ):
                                new_logprobs, token_entropy, values = self._train_forward(
                                    ro.query_response[inds], ro.attention_mask[inds], P, vh
                                )
                        pg = policy_loss(new_logprobs, ro.logprobs[inds], ro.advantages[inds], mask, args.cliprange)
                        loss = pg["loss"]
                        vf = {"loss": torch.zeros_like(loss), "clipfrac": torch.zeros_like(loss)}  # critic-free
                        if values is not None:
                            vf = value_loss(values[:, P - 1 : -1], ro.values[inds], ro.returns[inds], mask,
                                            args.cliprange_value)  # fmt: skip
                            loss = loss + args.vf_coef * vf["loss"]
                        acc.backward(loss)
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                            if self.guard.step_ok(loss, grad_norm):
                                self.optimizer.step()
                            self.optimizer.zero_grad()
                            self.grad_norms[mb] = grad_norm
                    with torch.no_grad():
                        entropy = masked_mean(token_entropy, mask)
                        if self.sampler_logprobs and mb == 0:  # before the first step: the weights that sampled
                            n = mask.sum()
                            err = token_prob_error(ro.logprobs[inds], new_logprobs.detach(), mask)
                            prob_error += torch.stack([err * n, n]).double()  # summed over tokens, and the count
                        stats[mb, micro] = torch.stack([pg["approxkl"], pg["clipfrac"], pg["loss"].detach(),
                                                        vf["loss"].detach(), vf["clipfrac"], pg["ratio_mean"],
                                                        entropy])  # fmt: skip
                mb += 1
        self.scheduler.step()
        per_minibatch = stats.mean(1)  # [minibatches, statistics]
        means = torch.cat([per_minibatch.mean(0), self.grad_norms.mean().unsqueeze(0)]).float()
        means = acc.reduce(means, "mean").tolist()  # across processes
        names = [f"{k}_avg" if k in AVERAGED else k for k in UPDATE_STATS] + ["policy/grad_norm"]
        out = dict(zip(names, means))
        if self.unwrapped.value is None:  # no value loss to report
            del out["loss/value_avg"], out["val/clipfrac_avg"]
        ratios = per_minibatch[:, UPDATE_STATS.index("val/ratio")].float()
        out["val/ratio_var"] = ratios.var().item() if len(ratios) > 1 else 0.0
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["train/nonfinite_skipped"] = self.guard.total
        if self.sampler_logprobs:
            # The sampler's log-probs (the rollout's) against the training forward's on the first minibatch's tokens,
            # every process's, whose forwards all run before the first optimizer step; with a policy forward the
            # rollout measures it over all tokens.
            total, tokens = acc.reduce(prob_error, "sum").tolist()
            out["val/sampler_token_prob_error"] = total / max(tokens, 1.0)
        return out

    def minibatch(self, i: int) -> dict:
        """The last update's statistics of minibatch ``i`` (in the order they ran), averaged over micro-batches."""
        values = self.minibatch_stats[i].mean(0).tolist()
        return {**dict(zip(UPDATE_STATS, values)), "policy/grad_norm": self.grad_norms[i].item()}

    # ------------------------------------------------------------------ metrics
    def log(self, row: dict, ro: Rollout, bar) -> None:
        args, acc = self.args, self.accelerator
        if self.judge is not None:
            gold = torch.tensor([self.judge(p, r) for p, r, _ in ro.texts], device=acc.device)
            row["objective/gold_score"] = acc.gather(gold).mean().item()
        self.history.append(row)
        if acc.is_main_process:
            with open(self.layout.run_metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}",
                            eos=f"{row['val/eos_rate']:.2f}")  # fmt: skip
            if args.sample_every and row["iteration"] % args.sample_every == 0:
                print_samples(ro.texts, row["iteration"], self.judge)
        if acc.log_with:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["iteration"])

    # ------------------------------------------------------------------ checkpoints
    def _start(self) -> None:
        """Resume from ``--resume_from_checkpoint``, or from the newest checkpoint of an interrupted run with
        the same fingerprint (a plain rerun continues), or start a fresh run directory (``--force``)."""
        acc, run = self.accelerator, self.layout.ppo_run
        spec = self.args.resume_from_checkpoint
        explicit = spec is not None
        if spec is None:
            found = ckpt.list_checkpoints(self.layout.run_checkpoints)
            recorded = ckpt.read_state(found[-1]).get("fingerprint", "") if found else None
            if art.continue_run(run, self.fingerprint, recorded, self.force, "PPO run", acc.is_main_process):
                spec = str(found[-1])
        if spec:
            path = ckpt.resolve(self.layout.run_checkpoints, spec)
            state = ckpt.load(path, acc, self.unwrapped, self.optimizer, self.scheduler)
            if state.get("fingerprint") != self.fingerprint:
                raise PipelineError(
                    f"{path} belongs to a run with other inputs or config; start anew without --resume_from_checkpoint"
                )
            published = (self.layout.stage("ppo") / art.MANIFEST).exists()
            if explicit and published and state["iteration"] >= self.args.num_iterations:
                raise PipelineError(
                    f"{path} ends a finished run (iteration {state['iteration']} of {self.args.num_iterations}): "
                    "there is nothing to resume; its stage output is the result"
                )
            self.iteration, self.cursor, self.history = state["iteration"], state["cursor"], state["history"]
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.score_moments.load_state_dict(state["score_moments"])
            self.guard.load_state_dict(state["nonfinite_steps"])
            if self.iteration >= self.args.num_iterations:
                # Killed after the last checkpoint but before ``ppo/`` was in place: publish it from there.
                acc.print(f"ppo: {path} ends the run; publishing its stage output")
            else:
                acc.print(f"ppo: resumed from {path} at iteration {self.iteration}")
        if acc.is_main_process:
            run.mkdir(parents=True, exist_ok=True)
            self.layout.run_metrics.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        if acc.log_with:
            acc.init_trackers("rlhf-ppo", config={k: str(v) for k, v in self.config["ppo"].items()})

    def save_checkpoint(self):
        state = {
            "iteration": self.iteration,
            "cursor": self.cursor,
            "history": self.history,
            "fingerprint": self.fingerprint,
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "nonfinite_steps": self.guard.state_dict(),
        }
        net = self.unwrapped
        return ckpt.save(self.layout.run_checkpoints, self.iteration, self.accelerator, net, self.optimizer,
                         self.scheduler, state, net.policy)  # fmt: skip

    # ------------------------------------------------------------------ publishing
    def publish(self) -> None:
        """Write ``ppo/`` atomically: adapters, merged policy, value weights, checkpoints, metrics, manifest."""
        from transformers import AutoModelForCausalLM

        from pipeline.modeling import merge_adapter_to_disk

        acc, history, is_main = self.accelerator, self.history, self.accelerator.is_main_process
        acc.wait_for_everyone()
        with art.stage_output(self.layout.root, "ppo", self.config, self.inputs, is_main) as out:
            if is_main:
                net = self.unwrapped
                net.policy.save_pretrained(str(out.path / art.POLICY_ADAPTER))
                if net.value is not None:
                    net.value.save_pretrained(str(out.path / art.VALUE))
                merge_adapter_to_disk(self.policy_path, str(out.path / art.POLICY_ADAPTER), out.path / art.POLICY,
                                      AutoModelForCausalLM, self.tokenizer)  # fmt: skip
                shutil.copy(self.layout.run_metrics, out.path / art.METRICS)
                # Hard links, not a move: the run's own copy stays until the stage is published.
                art.link_tree(self.layout.run_checkpoints, out.path / art.CHECKPOINTS)
                metrics = {
                    "final": history[-1],
                    "first": history[0],
                    "iterations": len(history),
                    "seconds_per_iteration": sum(h["time/iteration_s"] for h in history) / len(history),
                    "models": self.models,
                }
                out.write_manifest(metrics, self.tokenizer)
            acc.wait_for_everyone()
        if is_main:
            shutil.rmtree(self.layout.ppo_run, ignore_errors=True)
            acc.print(f"ppo: wrote {self.layout.stage('ppo')} (score {history[0]['objective/scores']:.3f} -> "
                      f"{history[-1]['objective/scores']:.3f}, kl {history[-1]['objective/kl']:.3f})")  # fmt: skip
