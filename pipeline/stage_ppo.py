"""Stage 3: PPO with GAE advantages on Accelerate + PEFT (our own loop; TRL no longer ships PPO).

Two base models serve four roles: policy = SFT model + a new LoRA adapter, reference = the same
module with the adapter disabled; value = reward model + a LoRA adapter (score head trained),
reward = the same module with the adapter disabled. The loop is ``pipeline/ppo/trainer.py``.

    accelerate launch pipeline/stage_ppo.py --config configs/ppo_demo.yaml
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml pipeline/stage_ppo.py \
        --config configs/ppo_demo.yaml
    rlhf ppo --config configs/ppo_demo.yaml                   # one process, no launcher
    accelerate launch pipeline/stage_ppo.py --config configs/ppo_demo.yaml   # again after a kill: continues

Writes ``<artifact_dir>/ppo/``: ``policy_adapter/``, ``policy/`` (merged), ``value/``,
``metrics.jsonl``, ``checkpoints/iter-*/``, ``manifest.json``. While running, checkpoints and
live metrics are in ``<artifact_dir>/ppo-run/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/stage_ppo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.allocator import restart_with_tuned_malloc
from pipeline.config import StageArguments, exit_process, run_cli
from pipeline.errors import PipelineError
from reward_models.composite import AGGREGATIONS  # a light import: torch loads lazily

ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")
ROLLOUT_LOGPROBS = ("auto", "sampler", "forward")

# Base-weight dtype -> the autocast precision it needs (None: plain float32).
PRECISION_PAIRS = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}
# PPO's settings of TRL's ModelConfig fields (the policy adapter; LoRA dropout is off in RLHF [N+]).
MODEL_DEFAULTS = dict(use_peft=True, lora_dropout=0.0, dtype="auto")


def arg(default, help: str, **metadata):
    """A dataclass field with its ``--help`` text."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class PPOArguments:
    """PPO hyper-parameters. Defaults follow the N+ study (Huang et al. 2024) unless noted."""

    # models (the policy and its adapter: --model_name_or_path, --lora_r, ... of TRL's ModelConfig)
    reward_model_path: list[str] | None = arg(
        None,
        "Reward model (default: <artifact_dir>/reward/model); any tokenizer. Several (the flag again, or several "
        "paths) make an ensemble; LoRA reward adapters (<dir>/reward/adapter) on one base share it. 'none': "
        "--reward_funcs only.",
        action="extend",
    )
    reward_aggregation: str = arg("mean", "How an ensemble's scores combine: mean, min, or mean_minus_std "
                                  "(mean - coef * std over members; Coste et al. 2023).",
                                  choices=list(AGGREGATIONS))  # fmt: skip
    reward_ensemble_coef: float = arg(1.0, "The std coefficient of --reward_aggregation mean_minus_std.")
    reward_funcs: list[str] | None = arg(
        None, "Rule rewards package.module:function, each (prompt messages, response text) -> float, weighted and "
        "added to the learned score (repeatable).", action="extend")  # fmt: skip
    reward_weights: list[float] | None = arg(None, "One weight per --reward_funcs entry (default 1 each).",
                                             action="extend")  # fmt: skip
    value_model_path: str | None = arg(None, "Value init (default: the reward model if it shares the tokenizer).")
    value_full_finetune: bool = arg(False, "Train all value weights, not a LoRA adapter (a third base model).")
    value_lora_layers: int | None = arg(
        None, "Value adapter on the top N layers only; default: the top quarter (8 of SmolLM2's 30), so the value "
        "backward stops there; -1: every layer.")  # fmt: skip
    # sizes
    num_iterations: int = arg(40, "PPO iterations (rollout + update).")
    rollout_batch_size: int = arg(8, "Prompts per iteration per process.")
    num_mini_batches: int = arg(1, "Minibatches per rollout batch (one optimizer step each).")
    per_device_train_batch_size: int = arg(8, "Micro-batch; gradient accumulation = minibatch / this.")
    local_rollout_forward_batch_size: int = arg(8, "Batch for generation and rollout forwards.")
    num_ppo_epochs: int = arg(1, "Passes over each rollout batch.")
    num_samples_per_prompt: int = arg(1, "Responses sampled per prompt each iteration (k; >= 2 for rloo, grpo).")
    advantage_estimator: str = arg("gae", "gae (a value model), or critic-free rloo, grpo, reinforce_pp.",
                                   choices=list(ESTIMATORS))  # fmt: skip
    # sampling
    response_length: int = arg(64, "Maximum new tokens per response.")
    max_prompt_length: int = arg(256, "Prompts longer than this (in tokens) are dropped, with a count.")
    temperature: float = arg(0.7, "Sampling temperature (log-probs use the same scaling).")
    top_k: int = arg(0, "Top-k (0 = off).")
    top_p: float = arg(1.0, "Top-p (1 = off).")
    merged_generation: bool = arg(True, "Sample from a merged copy of the policy (pipeline/ppo/generation.py).")
    rollout_logprobs: str = arg(
        "auto",
        "Where the rollout's policy log-probs (the PPO ratio's old side, the KL penalty's policy side) and entropy "
        "come from when the update does not reuse the rollout's forward: forward (a policy forward over the "
        "responses after sampling), or sampler (recorded while sampling: no forward; needs no --top_k/--top_p). "
        "auto: sampler in fp32 without top-k/top-p or a repetition penalty, where the two agree to rounding; "
        "forward otherwise.",
        choices=list(ROLLOUT_LOGPROBS),
    )
    # optimisation
    learning_rate: float = arg(3e-5, "AdamW learning rate (LoRA usually wants ~1e-5..1e-4).")
    lr_scheduler_type: str = arg("linear", "transformers scheduler name, stepped once per iteration.")
    max_grad_norm: float = arg(1.0, "Gradient-norm clip.")
    max_nonfinite_steps: int = arg(3, "Stop after more than this many non-finite steps in a row.")
    update_chunk_tokens: int = arg(
        512,
        "On one CPU process, the update's forward runs each micro-batch as "
        "length-sorted chunks of about this many tokens, each cut to its own longest "
        "row (the same loss and gradients, less padding); 0: one forward.",
    )
    # PPO / GAE
    gamma: float = arg(1.0, "Discount.")
    lam: float = arg(0.95, "GAE lambda.")
    cliprange: float = arg(0.2, "Policy ratio clip.")
    cliprange_value: float = arg(0.2, "Value clip.")
    vf_coef: float = arg(0.1, "Value-loss coefficient.")
    kl_coef: float = arg(0.05, "KL penalty beta (initial value when adaptive).")
    kl_estimator: str = arg("k1", "Per-token KL estimator: k1 or k3.", choices=["k1", "k3"])
    target_kl: float | None = arg(None, "Adaptive beta toward this sequence KL (Ziegler et al. 2019); None = fixed.")
    kl_horizon: int = arg(10000, "Horizon (episodes) of the adaptive KL controller.")
    missing_eos_penalty: float = arg(1.0, "Subtracted from the score of a response without EOS.")
    normalize_scores: bool = arg(False, "Normalise scores by running mean/std.")
    score_clip: float | None = arg(None, "Clip (normalised) scores to [-c, c].")
    # operations
    seed: int = arg(42, "Random seed.")
    save_every: int = arg(10, "Checkpoint every N iterations (and at the end).")
    sample_every: int = arg(10, "Print a table of sample completions every N iterations (0 = never).")
    resume_from_checkpoint: str | None = arg(None, "PATH or 'latest' (under <artifact_dir>/ppo-run/checkpoints).")
    stop_after_iterations: int | None = arg(None, "Stop after N iterations, leaving a checkpoint to resume.")
    report_to: str = arg("none", "Trackers for accelerate: none, all, tensorboard, wandb, ...")
    mixed_precision: str = arg("auto", "no, bf16 or fp16 (accelerate autocast); auto: what --dtype needs.")
    gold_judge: bool = arg(True, "Log the gold judge's score of rollouts (embedded task; never the reward).")


def resolve_precision(model_args, args: PPOArguments, has_cuda: bool) -> None:
    """``--dtype auto`` (the default): frozen bases in bfloat16 where bf16 matmuls are native (modeling.fast_bf16),
    float32 elsewhere. ``--mixed_precision auto``: the autocast that dtype needs. The run records what was chosen."""
    from pipeline.modeling import fast_bf16

    if model_args.dtype in (None, "auto"):
        model_args.dtype = "bfloat16" if fast_bf16(has_cuda) else "float32"
    if args.mixed_precision == "auto":
        args.mixed_precision = PRECISION_PAIRS.get(model_args.dtype) or "no"


def resolve_rollout_logprobs(model_args, args: PPOArguments, sizes, policy) -> None:
    """``--rollout_logprobs auto``: the sampler's own log-probs where they are the training forward's up to
    rounding (``val/sampler_token_prob_error`` checks it every iteration): fp32, the plain temperature-scaled
    distribution (no top-k/top-p, no repetition penalty or other processor from the policy's generation config),
    and an update that does not reuse the rollout's forward (that forward gives them at no cost). A policy forward
    otherwise: under bf16 decoding and training forwards round apart (OpenRLHF and verl recompute them for that
    reason). An explicit ``sampler`` where a processor changes the distribution is refused in one line. Run in
    ``setup``, once the policy and the batch sizes are known; the run records the choice."""
    from pipeline.decoding import generation_config_settings
    from pipeline.ppo.trainer import fuses_update

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    altered = generation_config_settings(base, repetition_penalty=True)
    if args.rollout_logprobs == "sampler" and altered:
        raise PipelineError(
            f"--rollout_logprobs sampler: the policy's generation config sets {altered[0]}, so the sampler draws "
            "from another distribution than the policy's; use --rollout_logprobs forward"
        )
    if args.rollout_logprobs == "auto":
        exact = model_args.dtype == "float32" and args.mixed_precision == "no"
        plain = not filtered_sampling(args) and not altered
        args.rollout_logprobs = "sampler" if exact and plain and not fuses_update(args, sizes) else "forward"


def filtered_sampling(args: PPOArguments) -> bool:
    """Whether top-k or top-p cut the sampled distribution."""
    return args.top_k > 0 or args.top_p < 1


def check_args(model_args, args: PPOArguments, has_cuda: bool) -> None:
    """Settings that cannot run, as one-line errors before anything is loaded (``auto`` settings resolved)."""
    from pipeline.modeling import check_model_args

    resolve_precision(model_args, args, has_cuda)

    if not model_args.use_peft:
        raise PipelineError("PPO trains a LoRA adapter on the policy; drop --use_peft false")
    check_model_args(model_args)
    if model_args.dtype not in PRECISION_PAIRS:
        raise PipelineError(f"--dtype {model_args.dtype!r}: use one of {', '.join(PRECISION_PAIRS)}")
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise PipelineError(f"--mixed_precision {args.mixed_precision!r}: use no, bf16, fp16 or auto")
    if args.mixed_precision == "fp16" and not has_cuda:
        raise PipelineError("--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision bf16")
    want = PRECISION_PAIRS[model_args.dtype]
    if want is not None and args.mixed_precision != want:
        raise PipelineError(
            f"--dtype {model_args.dtype} needs autocast in the same precision: add --mixed_precision {want}"
        )
    if args.value_full_finetune and args.value_lora_layers is not None:
        raise PipelineError("--value_lora_layers places the value adapter; drop it or --value_full_finetune")
    if args.value_lora_layers is not None and args.value_lora_layers < 1 and args.value_lora_layers != -1:
        raise PipelineError(f"--value_lora_layers {args.value_lora_layers}: pass N >= 1 (the top N layers), or -1 "
                            "for every layer")  # fmt: skip
    for name in ("gamma", "lam"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise PipelineError(f"--{name} {getattr(args, name)}: use a value in [0, 1]")
    if args.kl_coef < 0:
        raise PipelineError(f"--kl_coef {args.kl_coef}: use a value >= 0")
    if args.target_kl is not None and args.target_kl <= 0:
        raise PipelineError(f"--target_kl {args.target_kl}: use a value > 0, or leave it unset for a fixed beta")
    if args.kl_horizon <= 0:
        raise PipelineError(f"--kl_horizon {args.kl_horizon}: use a value > 0")
    if args.advantage_estimator not in ESTIMATORS:
        raise PipelineError(f"--advantage_estimator {args.advantage_estimator!r}: use one of {', '.join(ESTIMATORS)}")
    if args.advantage_estimator in ("rloo", "grpo") and args.num_samples_per_prompt < 2:
        raise PipelineError(f"--advantage_estimator {args.advantage_estimator} compares the samples of a prompt: "
                            "set --num_samples_per_prompt 2 or more")  # fmt: skip
    critic = ("value_model_path", "value_lora_layers")
    if args.advantage_estimator != "gae" and (args.value_full_finetune or any(getattr(args, n) for n in critic)):
        raise PipelineError(f"--advantage_estimator {args.advantage_estimator} uses no value model: drop "
                            "--value_model_path, --value_lora_layers and --value_full_finetune")  # fmt: skip
    if isinstance(args.reward_model_path, str):  # a YAML scalar
        args.reward_model_path = [args.reward_model_path]
    if isinstance(args.reward_funcs, str):
        args.reward_funcs = [args.reward_funcs]
    paths = args.reward_model_path or []
    if "none" in paths and (len(paths) > 1 or not args.reward_funcs):
        raise PipelineError("--reward_model_path none trains on --reward_funcs alone: give one or more "
                            "--reward_funcs and no other reward model")  # fmt: skip
    if args.reward_aggregation not in AGGREGATIONS:
        raise PipelineError(f"--reward_aggregation {args.reward_aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if args.reward_ensemble_coef < 0:
        raise PipelineError(f"--reward_ensemble_coef {args.reward_ensemble_coef}: use a value >= 0")
    if args.reward_weights and len(args.reward_weights) != len(args.reward_funcs or []):
        raise PipelineError(f"{len(args.reward_weights)} --reward_weights for {len(args.reward_funcs or [])} "
                            "--reward_funcs: give one weight per function")  # fmt: skip
    if args.kl_estimator not in ("k1", "k3"):  # a YAML value never meets argparse's choices
        raise PipelineError(f"--kl_estimator {args.kl_estimator!r}: use k1 or k3")
    positive = ("num_iterations", "rollout_batch_size", "num_mini_batches", "per_device_train_batch_size",
                "local_rollout_forward_batch_size", "num_ppo_epochs", "response_length", "save_every",
                "num_samples_per_prompt")  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineError(f"--{name} {value!r}: use a whole number >= 1")
    for name in ("temperature", "learning_rate", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise PipelineError(f"--{name} {getattr(args, name)}: use a value > 0")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise PipelineError(f"--top_p {args.top_p} / --top_k {args.top_k}: use 0 < top_p <= 1 and top_k >= 0")
    if args.sample_every < 0 or args.max_nonfinite_steps < 0 or args.update_chunk_tokens < 0:
        raise PipelineError("--sample_every, --max_nonfinite_steps and --update_chunk_tokens: use a value >= 0")
    if args.rollout_logprobs not in ROLLOUT_LOGPROBS:  # a YAML value never meets argparse's choices
        raise PipelineError(f"--rollout_logprobs {args.rollout_logprobs!r}: use {', '.join(ROLLOUT_LOGPROBS)}")
    if args.rollout_logprobs == "sampler" and filtered_sampling(args):
        raise PipelineError(
            "--rollout_logprobs sampler records log-probs under the top-k/top-p-filtered distribution, not the "
            "policy's: use --rollout_logprobs forward, or drop --top_k/--top_p"
        )


@dataclass
class Sizes:
    """Batch bookkeeping derived once from the arguments and the number of processes."""

    world_size: int
    local_mini_batch_size: int  # responses per minibatch: rollout_batch_size * k / num_mini_batches
    gradient_accumulation_steps: int  # minibatch / per_device_train_batch_size
    batch_size: int  # prompts per iteration, all processes
    episodes: int  # responses per iteration, all processes: batch_size * num_samples_per_prompt


def derive_sizes(args: PPOArguments, world_size: int) -> Sizes:
    """Batch sizes, once, after parsing; an inexact division is a one-line error."""
    from pipeline.ppo.core import exact_div

    responses = args.rollout_batch_size * args.num_samples_per_prompt  # per process and iteration
    what = "rollout_batch_size * num_samples_per_prompt"
    try:
        mini = exact_div(responses, args.num_mini_batches, f"{what} / num_mini_batches")
        accumulation = exact_div(
            mini, args.per_device_train_batch_size, "minibatch size / per_device_train_batch_size"
        )
        exact_div(responses, min(args.local_rollout_forward_batch_size, responses),
                  f"{what} / local_rollout_forward_batch_size")  # fmt: skip
    except ValueError as e:  # a user setting, not a crash
        raise PipelineError(str(e)) from None
    return Sizes(world_size, mini, accumulation, args.rollout_batch_size * world_size, responses * world_size)


@dataclass
class Built:
    """The loaded models and what the manifest records about them."""

    model: object  # PolicyAndValue
    tokenizer: object
    reward_fn: object  # (prompts, responses) -> Tensor [B]
    inputs: dict
    models: dict  # policy_path, value_path, reward_paths, same_tokenizer


def build(stage: StageArguments, model_args, args: PPOArguments, accelerator) -> Built:
    """Load the policy (+ LoRA), the value model (+ LoRA or in full) and, unless the value module can
    serve as the reward with its adapter off, a separate frozen reward model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline import artifacts as art
    from pipeline.modeling import contiguous_head, load_tokenizer, lora_config, value_lora_default
    from pipeline.packed_linear import pack_linears
    from pipeline.ppo.trainer import PolicyAndValue
    from reward_models.composite import CompositeReward, load_reward_func
    from reward_models.learned import (
        LearnedReward,
        adapter_base,
        check_reward_model,
        load_reward_members,
        load_reward_tokenizer,
    )

    layout = art.Layout(stage.artifact_dir)
    if model_args.model_name_or_path is None:
        art.require_stage(stage.artifact_dir, "sft", "ppo")
    if args.reward_model_path is None:
        art.require_stage(stage.artifact_dir, "reward", "ppo")
    policy_path = model_args.model_name_or_path or str(layout.model("sft"))
    reward_paths = [p for p in args.reward_model_path or [str(layout.model("reward"))] if p != "none"]
    for path in reward_paths:
        check_reward_model(path)
    funcs = [(spec, load_reward_func(spec)) for spec in args.reward_funcs or []]
    tok = load_tokenizer(policy_path, padding_side="left", revision=model_args.model_revision)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise PipelineError(f"{policy_path}: pad token equals EOS; start from an SFT artifact (it fixes this)")
    # One full reward model sharing the policy's tokenizer is also the value model's init, and then serves as
    # the reward with the value adapter off (one base for two roles). Otherwise the value starts from the policy.
    single = reward_paths[0] if len(reward_paths) == 1 and adapter_base(reward_paths[0]) is None else None
    same_tok = single is not None and load_reward_tokenizer(single, tok).get_vocab() == tok.get_vocab()
    value_path = args.value_model_path or (single if same_tok else policy_path)

    dtype = getattr(torch, model_args.dtype)
    policy_base = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype, revision=model_args.model_revision)
    policy_base.config.pad_token_id = tok.pad_token_id
    contiguous_head(policy_base)
    if len(tok) > policy_base.get_input_embeddings().weight.shape[0]:
        raise PipelineError(
            f"{policy_path}: its tokenizer has {len(tok)} tokens and the model's embedding "
            f"{policy_base.get_input_embeddings().weight.shape[0]}; pass a model and tokenizer that belong together"
        )
    policy = get_peft_model(
        policy_base, lora_config(model_args, "CAUSAL_LM", None, policy_base, model_args.lora_layers)
    )
    value = None  # critic-free estimators load no value model
    if args.advantage_estimator == "gae":
        value_base = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=dtype)
        value_base.config.pad_token_id = tok.pad_token_id
        if args.value_full_finetune:
            value = value_base
        else:
            if args.value_lora_layers is None:  # resolved here, so the manifest records the layers used
                args.value_lora_layers = value_lora_default(value_base)
            top_n = None if args.value_lora_layers == -1 else args.value_lora_layers
            value_lora = lora_config(model_args, "SEQ_CLS", ["score"], value_base, top_n, "--value_lora_layers")
            value = get_peft_model(value_base, value_lora)
    for m in (policy, value) if value is not None else (policy,):
        for mod in m.modules():  # [N+]: no dropout in RLHF
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        for p in m.parameters():  # half-precision bases: the optimizer updates float32 weights
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    for m in (policy, value) if value is not None else (policy,):
        pack_linears(m)  # the frozen bf16 base weights (pipeline/packed_linear.py); the adapters train as before
    model = PolicyAndValue(policy, value)
    batch = args.local_rollout_forward_batch_size
    if value is not None and value_path == single and not args.value_full_finetune:
        # The reward is the value module with its adapter off: the module every Accelerate wrapper holds.
        members = [LearnedReward(model.value, load_reward_tokenizer(single, tok), batch, disable_adapter=True)]
    else:
        members = load_reward_members(reward_paths, tok, dtype, accelerator.device, batch)
    reward_fn = CompositeReward(members, args.reward_aggregation, args.reward_ensemble_coef, funcs,
                                args.reward_weights)  # fmt: skip

    inputs = {"policy": art.input_record(model_args.model_name_or_path or layout.stage("sft"))}
    if args.reward_model_path is None:
        inputs["reward"] = art.input_record(layout.stage("reward"))
    else:  # one record per member: the ensemble's lineage
        for i, path in enumerate(reward_paths):
            inputs["reward" if i == 0 else f"reward_{i}"] = art.input_record(path)
    if value is None:
        value_path = None
    # Named by role, so that the fingerprint does not change with the artifact directory's location.
    roles = {single: "reward", policy_path: "policy"}
    inputs["value_init"] = None if value_path is None else roles.get(value_path) or art.input_record(value_path)
    models = {"policy_path": policy_path, "value_path": value_path, "reward_paths": reward_paths,
              "same_tokenizer": same_tok}  # fmt: skip
    return Built(model, tok, reward_fn, inputs, models)


def prompt_length(tokenizer, prompt: list[dict]) -> int:
    """Tokens of a prompt as the rollout encodes it (chat template with the generation prompt)."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def setup(stage: StageArguments, model_args, args: PPOArguments, accelerator):
    """Everything before the loop: sizes, seed, prompts, models, the run's config and fingerprint.
    Returns the :class:`~pipeline.ppo.trainer.PPOTrainer`, or None when the stage is already complete."""
    from accelerate.utils import set_seed

    from pipeline import artifacts as art
    from pipeline.data import load_for, source_record
    from pipeline.ppo.generation import sharded_weights
    from pipeline.ppo.trainer import PPOTrainer

    sharding = sharded_weights(accelerator)
    if sharding:  # checkpoints and adapters would be saved from rank 0's shard only
        raise PipelineError(
            f"PPO does not support {sharding} yet (its checkpoints would hold one process's shard); "
            "use DDP (accelerate_configs/multi_gpu_ddp.yaml) or DeepSpeed ZeRO-2"
        )
    sizes = derive_sizes(args, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = sizes.gradient_accumulation_steps
    set_seed(args.seed, device_specific=True)

    split = stage.dataset_train_split
    rows = load_for("prompt", stage.dataset_name, split, stage.dataset_config, stage.max_train_samples)
    built = build(stage, model_args, args, accelerator)
    inputs = {**built.inputs, "dataset": source_record("prompt", stage.dataset_name, split)}
    lengths = [prompt_length(built.tokenizer, r["prompt"]) for r in rows]
    prompts = [r["prompt"] for r, n in zip(rows, lengths) if n <= args.max_prompt_length]
    context = getattr(built.model.policy.config, "max_position_embeddings", None)
    longest = max((n for n in lengths if n <= args.max_prompt_length), default=0)
    if context and longest + args.response_length > context:
        raise PipelineError(
            f"a prompt of {longest} tokens plus --response_length {args.response_length} exceeds the policy's "
            f"context of {context} tokens; lower --max_prompt_length or --response_length"
        )
    if len(prompts) < len(rows):
        accelerator.print(
            f"ppo: dropped {len(rows) - len(prompts)} prompts longer than {args.max_prompt_length} tokens"
        )
    if len(prompts) < sizes.batch_size:
        raise PipelineError(f"{len(prompts)} usable prompts is fewer than one iteration's batch ({sizes.batch_size})")

    resolve_rollout_logprobs(model_args, args, sizes, built.model.policy)
    config = art.resolved_config(stage=stage, model=model_args, ppo=args, sizes=sizes)
    fingerprint = art.fingerprint(config, inputs)
    if args.resume_from_checkpoint is None and art.skip_if_complete(
        stage.artifact_dir, "ppo", fingerprint, stage.force, accelerator.print, accelerator.is_main_process
    ):
        return None
    judge = None
    if args.gold_judge and stage.dataset_name is None:
        from reward_models.gold_judge import score as judge
    return PPOTrainer(args, sizes, accelerator, built.model, built.tokenizer, built.reward_fn, prompts,
                      art.Layout(stage.artifact_dir), config, inputs, built.models["policy_path"], judge,
                      built.models, stage.force)  # fmt: skip


def main(stage: StageArguments, model_args, args: PPOArguments) -> dict | None:
    import torch
    from accelerate import Accelerator

    check_args(model_args, args, torch.cuda.is_available())
    from pipeline.artifacts import Layout

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(Layout(stage.artifact_dir).logs("ppo")),
    )
    try:
        trainer = setup(stage, model_args, args, accelerator)
        return None if trainer is None else trainer.train()
    finally:
        # On every exit (done, stopped early, skipped, failed): close trackers and the process
        # group, so no rank tears gloo/NCCL down under another (that aborts the process).
        accelerator.end_training()


def make_parser():
    from trl import TrlParser

    from pipeline.model_args import ModelArguments

    parser = TrlParser((StageArguments, ModelArguments, PPOArguments), prog="accelerate launch pipeline/stage_ppo.py")
    parser.set_defaults(**MODEL_DEFAULTS)
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser, main, argv)


if __name__ == "__main__":
    restart_with_tuned_malloc()
    exit_process(cli())
