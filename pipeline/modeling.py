"""Model and tokenizer helpers shared by every stage."""

from __future__ import annotations

import contextlib

from pipeline.errors import PipelineError

PAD_TOKEN = "<|pad|>"


def ensure_distinct_pad_token(tokenizer, model=None) -> None:
    """Give ``tokenizer`` a pad token different from EOS, and tell ``model`` about it.

    Many chat models ship with pad == eos (SmolLM2 does); then padding masks would hide real
    EOS tokens and a padded batch could not tell where a response ends. We reuse an existing
    special token that is neither EOS nor BOS (the ``unk`` token, e.g. SmolLM2's
    ``<|endoftext|>``) when there is one, else add ``<|pad|>`` and resize the embeddings.
    The SFT stage saves the tokenizer, so every later stage inherits the choice.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        pass
    elif tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (eos, tokenizer.bos_token_id):
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def contiguous_head(model):
    """Give ``model``'s vocabulary projection a contiguous input; returns ``model``.

    transformers projects only the positions it needs onto the vocabulary (``logits_to_keep``; the last prompt
    position in ``generate``'s prefill) by slicing ``hidden[:, -k:, :]``, a view whose leading dimensions are
    not contiguous. torch's matmul folds a 3-D input into one matrix product only when they are; otherwise it
    broadcasts the ``[V, d]`` weight to ``[B, d, V]``, copies it and runs a batched product (``should_fold`` in
    ATen's LinearAlgebra.cpp). With SmolLM2's 49,152-token vocabulary that is a copy of B x 28M weights per
    call, 0.48 s of a 1.17 s bf16 forward of 8 x 70 tokens on a 2-core CPU (docs/benchmarks.md). Copying the
    k kept positions instead costs B x k x d numbers; a contiguous input passes through untouched.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        head._contiguous_input = True
    return model


def inference_model(model):
    """``model`` set up for forwards without gradients: eval mode, frozen, a contiguous vocabulary-projection
    input (``contiguous_head``) and prepacked bf16 linear weights on a CPU (``pipeline/packed_linear.py``)."""
    from pipeline.packed_linear import pack_linears

    return pack_linears(contiguous_head(model.eval().requires_grad_(False)))


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for f in line.split(":", 1)[1].split()}  # fmt: skip


def fast_bf16(has_cuda: bool) -> bool:
    """Whether bf16 matrix products run natively here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (x86) or BF16 (Arm) instructions. Elsewhere bf16 is emulated, far slower than fp32: 0.8 against 125 GFLOP/s
    on an AVX2-only host (docs/benchmarks.md)."""
    if has_cuda:
        import torch

        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


BF16_FLAG_STAGES = ("pipeline.stage_sft", "pipeline.stage_reward", "pipeline.stage_eval")  # stages with --bf16


def native_bf16_here() -> bool:
    """``fast_bf16`` for the device a stage will use (the first GPU if there is one, else the CPU), as PPO's
    ``--dtype auto`` decides it."""
    import torch

    return fast_bf16(torch.cuda.is_available())


def warn_if_emulated_bf16(stage: str, bf16: bool) -> None:
    """One line on stderr when ``--bf16 true`` will run emulated (a CPU without AVX512-BF16, AMX or Arm BF16):
    the stage still runs as asked, but every matrix product is about 150 times slower than in fp32."""
    import sys

    if bf16 and not native_bf16_here():
        print(
            f"{stage}: warning: --bf16 true on a CPU without native bf16 (AVX512-BF16, AMX): every matmul is "
            "emulated, about 150x slower than fp32; add --bf16 false",
            file=sys.stderr,
            flush=True,
        )


def check_model_args(model_args) -> None:
    """Refuse, in one line, the ModelConfig flags no stage applies yet (rather than record and ignore them)."""
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, flag, False):
            raise PipelineError(f"--{flag}: quantised (QLoRA) loading is not supported yet; drop the flag")
    if getattr(model_args, "lora_target_parameters", None):
        raise PipelineError("--lora_target_parameters is not supported; use --lora_target_modules")


def load_tokenizer(path: str, padding_side: str = "right", revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load a tokenizer from {path!r} ({str(e).splitlines()[0]})") from None
    if tokenizer.chat_template is None:
        raise PipelineError(f"the tokenizer of {path!r} has no chat template; pass --chat_template_path FILE.jinja")
    tokenizer.padding_side = padding_side
    return tokenizer


def top_layers(model, n: int | None, flag: str = "--lora_layers") -> list[int] | None:
    """Indices of the top ``n`` transformer layers of ``model`` (None: all layers)."""
    if n is None:
        return None
    total = model.config.num_hidden_layers
    if not 1 <= n <= total:
        raise PipelineError(f"{flag} {n}: the model has {total} layers; pass 1..{total}")
    return list(range(total - n, total))


MATH_ATTENTION_MAX_TOKENS = 160  # the math kernel wins up to here; even at 192 (benchmarks/bench_kernels.py attention)


def training_attention(device, mixed_precision: str, tokens: int, grouped: bool = False):
    """A fresh context for a forward that is trained through, over sequences of ``tokens``: the math attention
    kernel on a CPU under bf16 up to ``MATH_ATTENTION_MAX_TOKENS``, else no change.

    On a CPU, torch's flash-attention backward in bf16 is the slower at short lengths: forward + backward of
    one layer's attention (8 rows, 9 heads of 64) took 12-13 ms against 6-7 ms at 70 tokens, about 20 ms
    against 11-14 ms at 128 and 32-35 against 22 ms at 160; at 192 and 256 they were even
    (``benchmarks/bench_kernels.py attention``;
    docs/benchmarks.md, 2026-12-03). The math kernel also holds each layer's full attention matrix for the
    backward, so long sequences keep flash; so does fp32, where flash is as fast or faster. The choice is made
    at the forward (the backward follows it). Used by SFT (each training forward) and by PPO's update forwards;
    when the update reuses the rollout's forward (``PPOTrainer.can_fuse``) every rollout scoring forward takes it
    too, so that the log-probs compared come from one kernel, while separate rollout forwards, which run without
    gradients, keep flash. Generation keeps the default kernels. On accelerators nothing changes.

    ``grouped`` (PPO's forwards): within the same bounds, transformers' SDPA models run
    ``pipeline.grouped_attention`` instead, the math kernel's arithmetic without its per-layer copies and
    searches (its docstring); whatever it passes on still takes the math kernel.
    """
    from contextlib import nullcontext

    if device.type != "cpu" or mixed_precision != "bf16" or tokens > MATH_ATTENTION_MAX_TOKENS:
        return nullcontext()
    return _math_attention(grouped)


@contextlib.contextmanager
def _math_attention(grouped: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.grouped_attention import grouped_sdpa

    with sdpa_kernel(SDPBackend.MATH), grouped_sdpa() if grouped else contextlib.nullcontext():
        yield


def value_lora_default(model) -> int:
    """PPO's default value-adapter depth: the top quarter of the layers (8 of SmolLM2-135M's 30), at least one.

    The value model starts from the reward model, whose top layers already score responses; adapting only them
    keeps the value backward out of the bottom three quarters of the network (docs/benchmarks.md, 2026-12-03
    afternoon: 2.12x -> 2.35x of TRL's PPO episodes/s). The demo recipe's multi-seed results were measured with
    8 layers.
    """
    return max(1, -(-model.config.num_hidden_layers // 4))


def linear_leaf_names(model) -> list[str]:
    """PEFT's "all-linear" spelled out as module names (it cannot be combined with a layer subset)."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in ("score", "lm_head")
        }
    )


def lora_config(
    model_args,
    task_type: str,
    modules_to_save: list[str] | None = None,
    model=None,
    top_n: int | None = None,
    flag: str = "--lora_layers",
):
    """A PEFT LoraConfig from TRL's ModelConfig fields (r, alpha, dropout, targets); with ``top_n``, on the
    top ``top_n`` transformer layers of ``model`` only, so the backward pass stops below them."""
    from peft import LoraConfig

    layers = top_layers(model, top_n, flag)
    return LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=getattr(model_args, "lora_dropout", 0.0),
        target_modules=model_args.lora_target_modules
        or ("all-linear" if layers is None else linear_leaf_names(model)),
        modules_to_save=modules_to_save
        if modules_to_save is not None
        else getattr(model_args, "lora_modules_to_save", None),
        use_rslora=getattr(model_args, "use_rslora", False),
        use_dora=getattr(model_args, "use_dora", False),
        layers_to_transform=layers,
    )


def merge_adapter_to_disk(base_path: str, adapter_path: str, out_path, model_cls, tokenizer, **load_kwargs) -> None:
    """Load base + saved adapter on CPU, merge, save safetensors (+ tokenizer) to ``out_path``.

    Reloading from disk rather than merging the training module keeps this correct under
    DeepSpeed ZeRO-3 and FSDP, where the training module holds only a shard of the weights.
    """
    from peft import PeftModel

    base = model_cls.from_pretrained(base_path, **load_kwargs)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_path, safe_serialization=True)
    tokenizer.save_pretrained(out_path)


def check_finite_training(trainer, stage: str) -> None:
    """Refuse to publish a stage whose loss or trainable weights went non-finite."""
    import math

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    bad_loss = any(not math.isfinite(float(x)) for x in losses)
    bad_weights = any(not p.detach().isfinite().all() for p in trainer.model.parameters() if p.requires_grad)
    if bad_loss or bad_weights:
        what = "loss" if bad_loss else "trainable weights"
        raise PipelineError(
            f"{stage}: the {what} became NaN/inf; lower --learning_rate, check the data and the start model; "
            "nothing was written"
        )


def resume_point(run_dir, fingerprint: str, force: bool, explicit: str | None, is_main_process: bool) -> str | None:
    """Where an SFT or reward run starts: the newest complete HF Trainer checkpoint in ``run_dir`` when the run
    there had this fingerprint (a plain rerun after a kill continues), ``explicit`` when given, else nothing
    (a fresh ``run_dir``). Checkpoints of a run with other inputs or config are refused unless ``force``."""
    from pathlib import Path

    from pipeline.artifacts import continue_run, run_fingerprint

    if explicit:
        return explicit
    complete = sorted(
        (p for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    recorded = run_fingerprint(run_dir) if complete else None
    return str(complete[-1]) if continue_run(run_dir, fingerprint, recorded, force, "run", is_main_process) else None


def one_cpu_process(accelerator) -> bool:
    """Whether training runs as one process on a CPU: where the reward loss and the PPO update split a batch
    into length-sorted chunks. There a padded position costs as much as a real one; DDP, FSDP and DeepSpeed
    expect one forward of the wrapped model per backward, and on accelerators the trade is unmeasured."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.NO and accelerator.device.type == "cpu"


def train_or_finish(trainer, resume: str | None):
    """``trainer.train(resume_from_checkpoint=resume)``, except when ``resume`` is the final checkpoint of its
    run (a kill came between it and the publish): HF's loop would then run one step past ``max_steps`` (it
    skips the checkpoint's batches and steps once more before it checks the end), so the checkpoint's adapter
    and trainer state are loaded instead and no step runs. Returns a ``TrainOutput`` either way."""
    import json
    from pathlib import Path

    if resume:
        state_file = Path(resume) / "trainer_state.json"
        saved = json.loads(state_file.read_text()) if state_file.exists() else {}
        if saved.get("max_steps") and saved.get("global_step", 0) >= saved["max_steps"]:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            from transformers import TrainerState
            from transformers.trainer_utils import TrainOutput

            weights = Path(resume) / "adapter_model.safetensors"
            if not weights.exists():
                raise PipelineError(f"{resume} holds no adapter_model.safetensors; rerun with --force to start anew")
            set_peft_model_state_dict(trainer.model, load_file(str(weights)))
            trainer.state = TrainerState.load_from_json(str(state_file))
            return TrainOutput(trainer.state.global_step, None, {})
    return trainer.train(resume_from_checkpoint=resume)


def train_summary(result, resume: str | None) -> dict:
    """The manifest's training figures from an HF ``TrainOutput``. After a resume, HF's ``training_loss`` is
    the mean over the steps this call ran (none when the kill came after the final checkpoint, where HF
    reports 0.0): the manifest says so with ``train_loss_from_step``, and has no loss when no step ran."""
    from pathlib import Path

    start = int(Path(resume).name.split("-")[-1]) if resume else 0
    ran = result.global_step - start
    return {
        "train_loss": result.training_loss if ran > 0 else None,
        "train_loss_from_step": start,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_steps": result.global_step,
    }


def loss_text(metrics: dict) -> str:
    """A published summary line's ``loss 0.1234, 56s`` (``loss 0.1234 over the steps after N, 56s`` after a
    resume), or ``no step ran: ...`` when the run resumed at its final checkpoint."""
    if metrics["train_loss"] is None:
        return "no step ran: resumed at the final checkpoint"
    start = metrics["train_loss_from_step"]
    text = f"loss {metrics['train_loss']:.4f}" + (f" over the steps after {start}" if start else "")
    return text + f", {metrics['train_runtime_s']:.0f}s"


def publish_lora(trainer, out_path, base_path: str, model_cls, tokenizer, **load_kwargs) -> None:
    """Save a LoRA trainer's adapter (``adapter/``) and the merged model (``model/``) into a staging dir.

    ``save_model`` gathers the adapter across processes; only the main process merges and
    cleans up (the trainer's pickled ``training_args.bin`` goes: the config is in the manifest).
    """
    from pathlib import Path

    out_path = Path(out_path)
    trainer.save_model(str(out_path / "adapter"))
    if trainer.accelerator.is_main_process:
        (out_path / "adapter" / "training_args.bin").unlink(missing_ok=True)
        merge_adapter_to_disk(
            base_path, str(out_path / "adapter"), out_path / "model", model_cls, tokenizer, **load_kwargs
        )
