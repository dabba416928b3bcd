"""Stage 1: supervised fine-tuning with LoRA (TRL ``SFTTrainer``).

Loss on the assistant completion only; SmolLM2's chat template has no generation markers,
so conversations are split into prompt/completion and TRL's completion-only loss is used.

Run on the embedded default (SmolLM2-135M-Instruct, embedded instruction-following data)::

    rlhf sft --config configs/sft_demo.yaml
    python pipeline/stage_sft.py --config configs/sft_demo.yaml      # same thing

Any model and data::

    rlhf sft --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name my_sft.jsonl \
        --artifact_dir runs/qwen --num_train_epochs 2 --lora_r 32

Writes ``<artifact_dir>/sft/``: ``adapter/`` (LoRA), ``model/`` (merged, safetensors, with
tokenizer), ``manifest.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/stage_sft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.allocator import restart_with_tuned_malloc
from pipeline.config import TRAINER_DEFAULTS, StageArguments, cpu_only, exit_process, run_cli, tensorboard_dir
from pipeline.errors import PipelineError

DEFAULTS = {**TRAINER_DEFAULTS, "learning_rate": 2e-4, "completion_only_loss": True}


def completion_trainer_class():
    """TRL's ``SFTTrainer`` with a cheaper loss for plain completion-only training.

    TRL projects every position onto the vocabulary in float32 (its fused LM head, which also
    computes the entropy of each position). For a completion-only loss we ask the model for the
    logits of the positions from the first completion token of the batch onwards only
    (``logits_to_keep``), under the trainer's autocast, and take the token-mean cross-entropy as
    TRL does. Anything else (packing, label smoothing, DFT, custom loss functions, MoE aux loss,
    sequence parallelism) goes to TRL's own ``compute_loss``. On a CPU under bf16 every loss forward of
    short sequences runs the math attention kernel, whose backward is the faster there.
    """
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from pipeline.modeling import training_attention

    class CompletionSFTTrainer(SFTTrainer):
        def _plain_completion_loss(self, inputs) -> bool:
            args = self.args
            sp = getattr(self.accelerator, "parallelism_config", None)
            return (
                "labels" in inputs
                and "attention_mask" in inputs
                and not args.packing
                and not args.padding_free
                and args.loss_type == "nll"
                and self.compute_loss_func is None
                and self.label_smoother is None
                and not self.aux_loss_enabled
                and not (sp is not None and getattr(sp, "sp_enabled", False))
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The attention kernel whose backward is the faster here (pipeline.modeling.training_attention).
            acc, tokens = self.accelerator, inputs["input_ids"].shape[-1]
            with training_attention(acc.device, acc.mixed_precision, tokens):
                return self._loss(model, inputs, return_outputs, num_items_in_batch)

        def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._plain_completion_loss(inputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"][:, 1:]  # logits at t predict the token at t + 1
            valid = labels != -100
            cols = valid.any(dim=0).nonzero()
            first = int(cols[0]) if len(cols) else labels.shape[1] - 1
            keep = labels.shape[1] + 1 - first  # logits of positions first .. end (the last one predicts nothing)
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**fwd, use_cache=False, logits_to_keep=keep).logits[:, :-1]
            target = labels[:, first:]
            loss_sum = F.cross_entropy(
                logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
            )
            num_tokens = valid.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())

            with torch.no_grad():  # the metrics TRL logs, minus the per-position entropy
                m = target != -100
                correct = ((logits.argmax(-1) == target) & m).sum()
                n_valid = self.accelerator.gather_for_metrics(m.sum()).sum()
                n_correct = self.accelerator.gather_for_metrics(correct).sum()
                self._metrics[mode]["mean_token_accuracy"].append((n_correct / n_valid).item() if n_valid > 0 else 0.0)
                if mode == "train":
                    self._total_train_tokens += (
                        self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                        // self._tp_size
                    )
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return CompletionSFTTrainer


def main(stage_args: StageArguments, training_args, model_args) -> dict | None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import artifacts as art
    from pipeline.data import load_for, source_record
    from pipeline.embedded import is_embedded, resolve_model_path
    from pipeline.modeling import (
        check_finite_training,
        check_model_args,
        contiguous_head,
        ensure_distinct_pad_token,
        load_tokenizer,
        lora_config,
        loss_text,
        publish_lora,
        resume_point,
        train_or_finish,
        train_summary,
        warn_if_emulated_bf16,
    )

    if not model_args.use_peft:
        raise PipelineError("the SFT stage trains a LoRA adapter; drop --use_peft false")
    check_model_args(model_args)
    data_source = stage_args.dataset_name
    train = load_for(
        "sft", data_source, stage_args.dataset_train_split, stage_args.dataset_config, stage_args.max_train_samples
    )
    model_path = resolve_model_path(model_args.model_name_or_path)
    base_id = "embedded" if is_embedded(model_args.model_name_or_path) else model_args.model_name_or_path
    data_id = source_record("sft", data_source, stage_args.dataset_train_split)
    inputs = {"base_model": {**art.input_record(model_path), "name": base_id}, "dataset": data_id}
    config = art.resolved_config(stage=stage_args, training=training_args, model=model_args)
    fingerprint = art.fingerprint(config, inputs)
    is_main = training_args.process_index == 0
    if art.skip_if_complete(stage_args.artifact_dir, "sft", fingerprint, stage_args.force, is_main_process=is_main):
        return None
    if is_main:
        warn_if_emulated_bf16("sft", bool(training_args.bf16))

    run_dir = art.Layout(stage_args.artifact_dir).run_dir("sft")
    resume = resume_point(run_dir, fingerprint, stage_args.force, training_args.resume_from_checkpoint, is_main)
    tensorboard_dir(stage_args.artifact_dir, "sft")
    tokenizer = load_tokenizer(model_path, revision=model_args.model_revision)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    ensure_distinct_pad_token(tokenizer, model)
    contiguous_head(model)

    with art.stage_output(stage_args.artifact_dir, "sft", config, inputs, training_args.process_index == 0) as out:
        training_args.output_dir = str(run_dir)
        trainer = completion_trainer_class()(
            model=model,
            args=training_args,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=lora_config(model_args, "CAUSAL_LM", model=model, top_n=model_args.lora_layers),
        )
        if len(trainer.train_dataset) == 0:  # TRL drops rows whose completion is cut away entirely
            raise PipelineError(
                f"every row of the SFT data is longer than --max_length {training_args.max_length} tokens "
                "before its completion starts; raise --max_length"
            )
        result = train_or_finish(trainer, resume)
        check_finite_training(trainer, "SFT")
        publish_lora(trainer, out.path, model_path, AutoModelForCausalLM, tokenizer)
        metrics = {
            **train_summary(result, resume),
            "train_rows": len(train),
            "log_history": trainer.state.log_history,
        }
        if trainer.accelerator.is_main_process:
            out.write_manifest(metrics, tokenizer)
        trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"sft: wrote {art.Layout(stage_args.artifact_dir).stage('sft')} ({loss_text(metrics)})")
    return metrics


def make_parser():
    from trl import SFTConfig, TrlParser

    from pipeline.model_args import ModelArguments

    parser = TrlParser((StageArguments, SFTConfig, ModelArguments), prog="rlhf sft")
    parser.set_defaults(**DEFAULTS, use_cpu=cpu_only())
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser, main, argv)


if __name__ == "__main__":
    restart_with_tuned_malloc()
    exit_process(cli())
