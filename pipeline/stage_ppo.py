"""Stage 3: PPO with GAE advantages on Accelerate + PEFT (our own loop; TRL no longer ships PPO).

Two base models serve four roles: policy = SFT model + a new LoRA adapter, reference = the same
module with the adapter disabled; value = reward model + a LoRA adapter (score head trained),
reward = the same module with the adapter disabled. See ``pipeline/ppo/trainer.py``.

    accelerate launch pipeline/stage_ppo.py --config configs/ppo_demo.yaml
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml pipeline/stage_ppo.py --config configs/ppo_demo.yaml
    rlhf ppo --config configs/ppo_demo.yaml                   # one process, no launcher
    accelerate launch pipeline/stage_ppo.py --config configs/ppo_demo.yaml --resume_from_checkpoint latest

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

from pipeline.config import StageArguments, run_cli

STAGE = "ppo"


# Base-weight dtype -> the autocast precision it needs (None: plain float32).
PRECISION_PAIRS = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class PPOArguments:
    """PPO hyper-parameters. Defaults follow the N+ study (Huang et al. 2024) unless noted."""

    # models
    policy_model_path: str | None = field(default=None, metadata={"help": "Start policy (default: <artifact_dir>/sft/model)."})
    reward_model_path: str | None = field(default=None, metadata={"help": "Reward model (default: <artifact_dir>/reward/model). Any AutoModelForSequenceClassification path; its tokenizer may differ."})
    value_model_path: str | None = field(default=None, metadata={"help": "Value init (default: the reward model when it shares the policy tokenizer, else the policy)."})
    value_full_finetune: bool = field(default=False, metadata={"help": "Train all value weights instead of a LoRA adapter (holds a third base model)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "LoRA targets (default: all-linear)."})
    value_lora_layers: int | None = field(default=None, metadata={
        "help": "Put the value adapter on the top N transformer layers only, so the value backward stops there "
                "(default: every layer)."})
    # sizes
    num_iterations: int = field(default=40, metadata={"help": "PPO iterations (rollout + update)."})
    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts per iteration per process."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout batch (one optimizer step each)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch; gradient accumulation = minibatch / this."})
    local_rollout_forward_batch_size: int = field(default=8, metadata={"help": "Batch for generation and rollout forwards."})
    num_ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch."})
    # sampling
    response_length: int = field(default=64, metadata={"help": "Maximum new tokens per response."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this (in tokens) are dropped, with a count."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs use the same scaling)."})
    top_k: int = field(default=0, metadata={"help": "Top-k (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p (1 = off)."})
    merged_generation: bool = field(default=True, metadata={
        "help": "Sample rollouts from a plain copy of the policy with the adapter merged in (one more set of base "
                "weights; 1.1-1.4x faster sampling here). Off, or under ZeRO-3/FSDP: sample through the PEFT model."})
    # optimisation
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (LoRA usually wants ~1e-5..1e-4)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name, stepped once per iteration."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    max_nonfinite_steps: int = field(default=3, metadata={"help": "Stop after more than this many non-finite steps in a row."})
    # PPO / GAE
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value-loss coefficient."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty beta (initial value when adaptive)."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimator: k1 or k3.", "choices": ["k1", "k3"]})
    target_kl: float | None = field(default=None, metadata={"help": "Adaptive beta toward this sequence KL (Ziegler et al. 2019); None = fixed."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive KL controller."})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "Subtracted from the score of a response without EOS."})
    normalize_scores: bool = field(default=False, metadata={"help": "Normalise scores by running mean/std."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip (normalised) scores to [-c, c]."})
    # operations
    seed: int = field(default=42, metadata={"help": "Random seed."})
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N iterations (and at the end)."})
    sample_every: int = field(default=10, metadata={"help": "Print a table of sample completions every N iterations (0 = never)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "PATH or 'latest' (under <artifact_dir>/ppo-run/checkpoints)."})
    stop_after_iterations: int | None = field(default=None, metadata={"help": "Stop this invocation after N iterations, leaving a checkpoint to resume (time-boxed runs)."})
    report_to: str = field(default="none", metadata={"help": "Trackers for accelerate: none, all, tensorboard, wandb, ..."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (accelerate autocast)."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights of the frozen base models: float32, bfloat16 or float16 (trainable LoRA and head weights stay "
                "float32). Half precision needs --mixed_precision bf16 or fp16.",
        "choices": list(PRECISION_PAIRS)})
    gold_judge: bool = field(default=True, metadata={"help": "Also log the programmatic gold judge's score of rollouts (embedded task; not used as reward)."})


def check_precision(args: PPOArguments, has_cuda: bool) -> None:
    """``--dtype`` and ``--mixed_precision`` must name a pair that can run here (one-line errors)."""
    from pipeline.artifacts import PipelineError

    if args.dtype not in PRECISION_PAIRS:
        raise PipelineError(f"--dtype {args.dtype!r}: use one of {', '.join(PRECISION_PAIRS)}")
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise PipelineError(f"--mixed_precision {args.mixed_precision!r}: use no, bf16 or fp16")
    if args.mixed_precision == "fp16" and not has_cuda:
        raise PipelineError("--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision bf16")
    want = PRECISION_PAIRS[args.dtype]
    if want is not None and args.mixed_precision != want:
        raise PipelineError(f"--dtype {args.dtype} needs autocast in the same precision: add --mixed_precision {want}")


def derive_sizes(args: PPOArguments, world_size: int) -> None:
    """Batch bookkeeping, once, after parsing; an inexact division is an error."""
    from pipeline.artifacts import PipelineError
    from pipeline.ppo.core import exact_div

    args.world_size = world_size
    try:
        args.local_mini_batch_size = exact_div(args.rollout_batch_size, args.num_mini_batches, "rollout_batch_size / num_mini_batches")
        args.gradient_accumulation_steps = exact_div(
            args.local_mini_batch_size, args.per_device_train_batch_size, "minibatch size / per_device_train_batch_size"
        )
        exact_div(args.rollout_batch_size, min(args.local_rollout_forward_batch_size, args.rollout_batch_size),
                  "rollout_batch_size / local_rollout_forward_batch_size")
    except ValueError as e:  # a user setting, not a crash: one line, exit 2
        raise PipelineError(str(e)) from None
    args.batch_size = args.rollout_batch_size * world_size  # episodes per iteration


def build(args: PPOArguments, stage: StageArguments, accelerator):
    """Load models and tokenizers; returns (model, policy tokenizer, reward_fn, inputs record, model paths)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import artifacts as art
    from pipeline.modeling import load_tokenizer, lora_config, reward_scores
    from pipeline.ppo.trainer import PolicyAndValue

    if args.policy_model_path is None:
        art.require_stage(stage.artifact_dir, "sft", "ppo")
    if args.reward_model_path is None:
        art.require_stage(stage.artifact_dir, "reward", "ppo")
    policy_path = args.policy_model_path or str(art.model_dir(stage.artifact_dir, "sft"))
    reward_path = args.reward_model_path or str(art.model_dir(stage.artifact_dir, "reward"))
    tok = load_tokenizer(policy_path, padding_side="left")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise art.PipelineError(f"{policy_path}: pad token equals EOS; start from an SFT artifact (it fixes this)")
    reward_tok = AutoTokenizer.from_pretrained(reward_path)
    same_tok = reward_tok.get_vocab() == tok.get_vocab()
    value_path = args.value_model_path or (reward_path if same_tok else policy_path)
    if reward_tok.pad_token is None:
        reward_tok.pad_token = reward_tok.eos_token
    if reward_tok.chat_template is None:
        reward_tok.chat_template = tok.chat_template  # an encoder RM: score the same rendered conversation

    def lora(task, model=None, top_n=None):
        return lora_config(args, task, ["score"] if task == "SEQ_CLS" else None, model, top_n, "--value_lora_layers")

    dtype = getattr(torch, args.dtype)
    policy_base = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    policy_base.config.pad_token_id = tok.pad_token_id
    policy = get_peft_model(policy_base, lora("CAUSAL_LM"))
    value_base = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=dtype)
    value_base.config.pad_token_id = tok.pad_token_id
    if args.value_full_finetune:
        if args.value_lora_layers is not None:
            raise art.PipelineError("--value_lora_layers places the value adapter; drop it or --value_full_finetune")
        value = value_base
    else:
        value = get_peft_model(value_base, lora("SEQ_CLS", value_base, args.value_lora_layers))
    shares_reward = value_path == reward_path and not args.value_full_finetune
    if shares_reward:
        reward_model = None  # reward = value module with its adapter disabled
    else:
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=dtype).eval()
        reward_model.requires_grad_(False)
        reward_model.to(accelerator.device)
    for m in (policy, value):
        for mod in m.modules():  # [N+]: no dropout in RLHF
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        for p in m.parameters():  # half-precision bases: the optimizer updates float32 weights
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    model = PolicyAndValue(policy, value)

    def reward_fn(prompts, responses):
        if reward_model is not None:
            return reward_scores(reward_model, reward_tok, prompts, responses, args.local_rollout_forward_batch_size)
        # `model` is the module every Accelerate wrapper (DDP, DeepSpeed, FSDP) holds inside.
        with model.value.disable_adapter():
            return reward_scores(model.value, reward_tok, prompts, responses, args.local_rollout_forward_batch_size)

    inputs = {
        "policy": art.input_record(art.stage_dir(stage.artifact_dir, "sft") if args.policy_model_path is None else policy_path),
        "reward": art.input_record(art.stage_dir(stage.artifact_dir, "reward") if args.reward_model_path is None else reward_path),
        "value_init": value_path,
    }
    return model, tok, reward_fn, inputs, {"policy_path": policy_path, "value_path": value_path,
                                                          "reward_path": reward_path, "same_tokenizer": same_tok}


def main(stage_args: StageArguments, args: PPOArguments) -> dict | None:
    import torch
    from accelerate import Accelerator

    check_precision(args, torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
    )
    try:
        return train(stage_args, args, accelerator)
    finally:
        # On every exit (done, stopped early, skipped, failed): close trackers and the process
        # group, so no rank tears gloo/NCCL down under another (that aborts the process).
        accelerator.end_training()


def train(stage_args: StageArguments, args: PPOArguments, accelerator) -> dict | None:
    import json
    import shutil
    import time

    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from pipeline import artifacts as art
    from pipeline.data import load_for
    from pipeline.ppo import checkpoint as ckpt
    from pipeline.ppo.core import AdaptiveKLController, FixedKLController, RunningMoments
    from pipeline.ppo.trainer import PPOLoop
    from pipeline.ppo_report import print_samples

    derive_sizes(args, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    is_main = accelerator.is_main_process
    set_seed(args.seed, device_specific=True)

    prompts_ds = load_for("prompt", stage_args.dataset_name, stage_args.dataset_train_split,
                          stage_args.dataset_config, stage_args.max_train_samples)
    model, tok, reward_fn, inputs, paths = build(args, stage_args, accelerator)
    inputs["dataset"] = art.input_record(stage_args.dataset_name or art.REPO_ROOT / "data/embedded/ppo_prompts.jsonl")
    lengths = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True)) for r in prompts_ds]
    keep = [i for i, n in enumerate(lengths) if n <= args.max_prompt_length]
    if len(keep) < len(prompts_ds):
        accelerator.print(f"ppo: dropped {len(prompts_ds) - len(keep)} prompts longer than {args.max_prompt_length} tokens")
    prompts = [prompts_ds[i]["prompt"] for i in keep]
    if len(prompts) < args.batch_size:
        raise art.PipelineError(f"{len(prompts)} usable prompts is fewer than one iteration's batch ({args.batch_size})")

    config = {"stage": vars(stage_args).copy(), "ppo": {k: v for k, v in vars(args).items()}}
    config["stage"].pop("force", None)
    for k in ("resume_from_checkpoint", "stop_after_iterations", "report_to", "sample_every", "save_every"):
        config["ppo"].pop(k, None)
    fingerprint = art.config_fingerprint(config, inputs)
    if args.resume_from_checkpoint is None and art.skip_if_complete(
            stage_args.artifact_dir, STAGE, fingerprint, stage_args.force, accelerator.print):
        return None

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=args.num_iterations)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl
              else FixedKLController(args.kl_coef))
    moments = RunningMoments()
    sampler = None
    if args.merged_generation:
        from pipeline.ppo.generation import MergedPolicy, unsupported_reason

        policy = accelerator.unwrap_model(model).policy
        reason = unsupported_reason(policy, accelerator)
        if reason is None:
            sampler = MergedPolicy(policy)
        else:
            accelerator.print(f"ppo: sampling through the PEFT model ({reason})")
    loop = PPOLoop(args, accelerator, model, optimizer, scheduler, tok, reward_fn, kl_ctl, moments, sampler)
    judge = None
    if args.gold_judge and stage_args.dataset_name is None:
        from reward_models.gold_judge import score as judge

    run_dir = art.stage_dir(stage_args.artifact_dir, STAGE).parent / "ppo-run"
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    start_iter, cursor, history = 0, 0, []
    if args.resume_from_checkpoint:
        path = ckpt.resolve(ckpt_root, args.resume_from_checkpoint)
        state = ckpt.load(path, accelerator, accelerator.unwrap_model(model), optimizer, scheduler)
        if state.get("fingerprint") != fingerprint:
            raise art.PipelineError(f"{path} belongs to a run with other inputs or config; start anew without --resume_from_checkpoint")
        start_iter, cursor, history = state["iteration"], state["cursor"], state["history"]
        kl_ctl.load_state_dict(state["kl_controller"])
        moments.load_state_dict(state["score_moments"])
        loop.nonfinite_in_a_row, loop.nonfinite_total = state["nonfinite_steps"]
        accelerator.print(f"ppo: resumed from {path} at iteration {start_iter}")
    elif is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    if accelerator.log_with:
        accelerator.init_trackers("rlhf-ppo", config={k: str(v) for k, v in config["ppo"].items()})

    def next_batch(cursor: int) -> list[list[dict]]:
        """This process's prompts for the iteration starting at global ``cursor`` (epoch-wise shuffles)."""
        g = args.batch_size
        epoch, offset = divmod(cursor, len(prompts) - len(prompts) % g)
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        idx = perm[offset : offset + g][accelerator.process_index * args.rollout_batch_size :][: args.rollout_batch_size]
        return [prompts[i] for i in idx]

    def save_checkpoint(iteration: int):
        state = {"iteration": iteration, "cursor": cursor, "history": history, "fingerprint": fingerprint,
                 "kl_controller": kl_ctl.state_dict(), "score_moments": moments.state_dict(),
                 "nonfinite_steps": [loop.nonfinite_in_a_row, loop.nonfinite_total]}
        unwrapped = accelerator.unwrap_model(model)
        return ckpt.save(ckpt_root, iteration, accelerator, unwrapped, optimizer, scheduler, state, unwrapped.policy)

    stop_at = args.num_iterations if args.stop_after_iterations is None else min(args.num_iterations, start_iter + args.stop_after_iterations)
    bar = tqdm(range(start_iter, stop_at), initial=start_iter, total=args.num_iterations, desc="ppo", disable=not is_main)
    for iteration in bar:
        t0 = time.perf_counter()
        batch = next_batch(cursor)
        cursor += args.batch_size
        ro = loop.rollout(batch)
        t_rollout = time.perf_counter() - t0
        upd = loop.update(ro)
        upd.pop("minibatches")
        loop.kl_update(ro.stats, args.batch_size)
        row = {"iteration": iteration + 1, "episode": cursor, **ro.stats, **upd,
               "time/rollout_s": t_rollout, "time/iteration_s": time.perf_counter() - t0}
        if judge is not None:
            gold = torch.tensor([judge(p, r) for p, r, _ in ro.texts], device=accelerator.device)
            row["objective/gold_score"] = accelerator.gather(gold).mean().item()
        history.append(row)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}",
                            eos=f"{row['val/eos_rate']:.2f}")
            if args.sample_every and (iteration + 1) % args.sample_every == 0:
                print_samples(ro.texts, iteration + 1, judge)
        if accelerator.log_with:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=iteration + 1)
        done = iteration + 1
        if done % args.save_every == 0 or done == stop_at:
            save_checkpoint(done)
    bar.close()
    if stop_at < args.num_iterations:
        accelerator.print(f"ppo: stopped after iteration {stop_at} of {args.num_iterations}; "
                          f"continue with --resume_from_checkpoint latest")
        return {"stopped_at": stop_at, "history": history}

    # Publish artifacts/ppo atomically: adapters, merged policy, value weights, checkpoints, metrics.
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import merge_adapter_to_disk

    accelerator.wait_for_everyone()
    with art.stage_output(stage_args.artifact_dir, STAGE, config, inputs, is_main) as out:
        if is_main:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.policy.save_pretrained(str(out.path / "policy_adapter"))
            unwrapped.value.save_pretrained(str(out.path / "value"))
            merge_adapter_to_disk(paths["policy_path"], str(out.path / "policy_adapter"), out.path / "policy",
                                  AutoModelForCausalLM, tok)
            shutil.copy(metrics_path, out.path / "metrics.jsonl")
            shutil.move(str(ckpt_root), str(out.path / "checkpoints"))
            final = {k: v for k, v in history[-1].items()}
            first = history[0]
            metrics = {"final": final, "first": first, "iterations": len(history),
                       "seconds_per_iteration": sum(h["time/iteration_s"] for h in history) / len(history),
                       "models": paths}
            out.write_manifest(metrics, tok)
        accelerator.wait_for_everyone()
    if is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
        accelerator.print(f"ppo: wrote {art.stage_dir(stage_args.artifact_dir, STAGE)} "
                          f"(score {history[0]['objective/scores']:.3f} -> {history[-1]['objective/scores']:.3f}, "
                          f"kl {history[-1]['objective/kl']:.3f})")
    return {"history": history}


def make_parser():
    from trl import TrlParser

    return TrlParser((StageArguments, PPOArguments), prog="accelerate launch pipeline/stage_ppo.py")


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
