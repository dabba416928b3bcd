"""Stage 2: reward-model training with LoRA (TRL ``RewardTrainer``), from the SFT model.

The score head is trained in full (PEFT ``SEQ_CLS`` puts it in ``modules_to_save``); the
backbone gets a LoRA adapter. After training we report held-out pairwise accuracy: the
share of test pairs whose chosen reply scores strictly above the rejected one.

    rlhf reward --config configs/reward_demo.yaml
    rlhf reward --dataset_name my_pairs.jsonl --eval_dataset_name my_pairs_test.jsonl --artifact_dir runs/x

Reads ``<artifact_dir>/sft/model`` unless ``--model_name_or_path`` names another start.
Writes ``<artifact_dir>/reward/``: ``adapter/``, ``model/`` (merged scorer + tokenizer), ``manifest.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/stage_reward.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.allocator import restart_with_tuned_malloc
from pipeline.config import TRAINER_DEFAULTS, StageArguments, cpu_only, exit_process, run_cli, tensorboard_dir
from pipeline.errors import PipelineError

DEFAULTS = {
    **TRAINER_DEFAULTS,
    "learning_rate": 1e-4,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "no",
    "center_rewards_coefficient": 0.01,
}


def pairwise_accuracy(model, tokenizer, pairs, batch_size: int = 16) -> dict:
    """Held-out accuracy (ties count as wrong) and mean margin of a reward model on preference rows."""
    from reward_models.learned import reward_pair_scores

    prompts = [r["prompt"] for r in pairs]
    chosen, rejected = reward_pair_scores(model, tokenizer, prompts, [r["chosen"][0]["content"] for r in pairs],
                                          [r["rejected"][0]["content"] for r in pairs], batch_size)  # fmt: skip
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin_mean": (chosen - rejected).mean().item(),
        "num_pairs": len(pairs),
    }


def reward_trainer_class():
    """TRL's ``RewardTrainer`` with ``--train_sampling_strategy group_by_length`` working.

    Grouping pairs of similar length pads less: the collator pads both replies of every pair in a batch to the
    batch's longest, and the embedded task's pairs are 23% padding in random batches of 8 against 7% grouped
    (docs/benchmarks.md, 2026-12-04 morning). transformers' ``LengthGroupedSampler`` cannot infer lengths from
    TRL's tokenized ``chosen_ids``/``rejected_ids`` columns, and the trainer drops any other column before it
    samples; this class adds a pair's length (its longer reply, what it pads to) as the sampler's
    ``--length_column_name`` and keeps that column.

    On one CPU process its loss runs each batch through ``PairForward``: packed as prefix trees (each pair's shared
    prompt once, no padding) or else in length-sorted chunks, the same loss with less computed."""
    from datasets import Dataset
    from trl import RewardTrainer

    from pipeline.modeling import one_cpu_process

    class GroupedRewardTrainer(RewardTrainer):
        def _grouped(self, args) -> bool:
            return args.train_sampling_strategy == "group_by_length"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            name = args.length_column_name
            if self._grouped(args) and isinstance(dataset, Dataset) and name not in dataset.column_names:
                dataset = dataset.map(lambda ex: {name: max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))})
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self._grouped(self.args) and self.args.length_column_name not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, self.args.length_column_name]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if one_cpu_process(self.accelerator):
                model = PairForward(model, PAIR_CHUNK_TOKENS, self.accelerator.autocast)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return GroupedRewardTrainer


# Tokens per forward of a training batch in ``PairForward``: a packed sequence, or rows x the chunk's longest.
PAIR_CHUNK_TOKENS = 1024


class PairForward:
    """A sequence-classification model called on TRL's reward batch (the chosen replies' rows, then the rejected
    ones, right-padded) with less computed than one forward over the padded batch, and the same scores (so the
    same loss and gradients, up to rounding):

    - Where the model allows it (``decoding.can_pack_prefixes``: a decoder with a score head, full-attention
      layers, eager or SDPA attention, no dropout), the batch runs packed as prefix trees
      (``decoding.packed_last_outputs``): the tokens a pair's two rows share (the rendered prompt, 58% of the
      embedded pairs' tokens) once per pair, the system turn every row shares once, no padding, in sequences of
      about ``chunk_tokens`` tokens.
    - Otherwise the rows run in length-sorted chunks, each cut to its own longest row.

    The collator pads both replies of every pair in a batch to the batch's longest: 23% of the embedded task's
    random batches of 8 pairs, 12.5% in chunks of 1024 tokens (docs/benchmarks.md, 2026-12-04 midday).
    Length-grouped batches pad less but change which pairs train together; this changes nothing about what is
    trained on. The trainer uses it on one CPU process only: DDP and sharded wrappers expect one forward per
    backward, and on accelerators the trade is unmeasured. ``autocast`` is the trainer's mixed-precision context,
    which a prepared model's own forward would enter."""

    def __init__(self, model, chunk_tokens: int, autocast=None):
        import contextlib

        self.model, self.chunk_tokens = model, chunk_tokens
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, input_ids, attention_mask, **kwargs):
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        from pipeline import decoding

        run = self._grouping(input_ids, attention_mask)
        if run is not None:
            groups = torch.arange(len(input_ids) // 2, device=input_ids.device).repeat(2)  # rows i and B + i: pair i
            with self.autocast():
                scores = decoding.packed_last_outputs(
                    run, run.model, input_ids, attention_mask, groups, budget=self.chunk_tokens
                )
            return SequenceClassifierOutputWithPast(logits=scores.unsqueeze(-1))
        lengths = attention_mask.sum(1)
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        right_padded = torch.equal(attention_mask.bool(), columns[None, :] < lengths[:, None])
        chunks = list(decoding.length_chunks(lengths.cpu(), torch.zeros_like(lengths.cpu()), self.chunk_tokens))
        if len(chunks) == 1 or not right_padded:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        order, logits = [], []
        for rows, width, _ in chunks:
            out = self.model(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width], **kwargs)
            order += rows
            logits.append(out.logits)
        inverse = torch.argsort(torch.tensor(order, device=input_ids.device))
        return SequenceClassifierOutputWithPast(logits=torch.cat(logits)[inverse])

    def _grouping(self, input_ids, attention_mask):
        """The scorer ``packed_last_outputs`` runs for this batch of pairs (``decoding.packed_scorer``), or None."""
        from pipeline import decoding

        return None if len(input_ids) % 2 else decoding.packed_scorer(self.model, input_ids, attention_mask)


def start_model(artifact_dir: str, model_name_or_path: str | None) -> tuple[str, dict]:
    """The model the reward model starts from (default: the SFT stage's merged model) and its input record."""
    from pipeline import artifacts as art

    if model_name_or_path:
        return model_name_or_path, art.input_record(model_name_or_path)
    art.require_stage(artifact_dir, "sft", "reward")
    layout = art.Layout(artifact_dir)
    return str(layout.model("sft")), art.input_record(layout.stage("sft"))


def load_pairs(stage_args: StageArguments):
    """``(train pairs, held-out pairs, their input records)``; the held-out ones come from
    ``--eval_dataset_name`` when given, else from the test split of ``--dataset_name``."""
    from pipeline.data import load_for, source_record

    a = stage_args
    source, test_source = a.dataset_name, a.eval_dataset_name or a.dataset_name
    train = load_for("preference", source, a.dataset_train_split, a.dataset_config, a.max_train_samples)
    test = load_for("preference", test_source, a.dataset_test_split, a.dataset_config, a.max_eval_samples)
    records = {
        "train": source_record("preference", source, a.dataset_train_split),
        "test": source_record("preference", test_source, a.dataset_test_split),
    }
    return train, test, records


def main(stage_args: StageArguments, training_args, model_args) -> dict | None:
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    from pipeline import artifacts as art
    from pipeline.modeling import (
        check_finite_training,
        check_model_args,
        inference_model,
        load_tokenizer,
        lora_config,
        loss_text,
        publish_lora,
        resume_point,
        train_or_finish,
        train_summary,
        warn_if_emulated_bf16,
    )
    from pipeline.packed_linear import pack_linears

    if not model_args.use_peft:
        raise PipelineError("the reward stage trains a LoRA adapter with a full score head; drop --use_peft false")
    check_model_args(model_args)
    start, start_record = start_model(stage_args.artifact_dir, model_args.model_name_or_path)
    train, test, data_files = load_pairs(stage_args)
    inputs = {"start_model": start_record, "dataset": data_files}
    config = art.resolved_config(stage=stage_args, training=training_args, model=model_args)
    fingerprint = art.fingerprint(config, inputs)
    is_main = training_args.process_index == 0
    if art.skip_if_complete(stage_args.artifact_dir, "reward", fingerprint, stage_args.force, is_main_process=is_main):
        return None
    if is_main:
        warn_if_emulated_bf16("reward", bool(training_args.bf16))

    run_dir = art.Layout(stage_args.artifact_dir).run_dir("reward")
    resume = resume_point(run_dir, fingerprint, stage_args.force, training_args.resume_from_checkpoint, is_main)
    tensorboard_dir(stage_args.artifact_dir, "reward")
    tokenizer = load_tokenizer(start, revision=model_args.model_revision)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PipelineError(f"{start}: pad token equals EOS; start from an SFT artifact (it fixes this)")
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    # The new score head is initialised here, before the trainer seeds itself: seed first, so one seed gives
    # one reward model (without this, two runs of one recipe gave different reward models).
    set_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        start, num_labels=1, dtype=dtype, revision=model_args.model_revision
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    RewardTrainer = reward_trainer_class()
    with art.stage_output(stage_args.artifact_dir, "reward", config, inputs, training_args.process_index == 0) as out:
        training_args.output_dir = str(run_dir)
        trainer = RewardTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=lora_config(model_args, "SEQ_CLS", ["score"], model, model_args.lora_layers),
        )
        pack_linears(trainer.model)  # the frozen base's bf16 products on prepacked weights (pipeline/packed_linear.py)
        result = train_or_finish(trainer, resume)
        check_finite_training(trainer, "reward model")
        publish_lora(trainer, out.path, start, AutoModelForSequenceClassification, tokenizer, num_labels=1)
        if trainer.accelerator.is_main_process:
            # Score the held-out pairs with the merged model exactly as later stages will load it, on the
            # training device and under the training precision.
            scorer = inference_model(AutoModelForSequenceClassification.from_pretrained(out.path / "model"))
            scorer.to(trainer.accelerator.device)
            with trainer.accelerator.autocast():
                held_out = pairwise_accuracy(scorer, tokenizer, list(test), training_args.per_device_eval_batch_size)
            metrics = {
                **train_summary(result, resume),
                "train_pairs": len(train),
                "test": held_out,
                "log_history": trainer.state.log_history,
            }
            out.write_manifest(metrics, tokenizer)
            print(
                f"reward: held-out pairwise accuracy {held_out['accuracy']:.3f} on {held_out['num_pairs']} pairs "
                f"(train {loss_text(metrics)})"
            )
        trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
    return None


def make_parser():
    from trl import RewardConfig, TrlParser

    from pipeline.model_args import ModelArguments

    parser = TrlParser((StageArguments, RewardConfig, ModelArguments), prog="rlhf reward")
    parser.set_defaults(**DEFAULTS, use_cpu=cpu_only())
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser, main, argv)


if __name__ == "__main__":
    restart_with_tuned_malloc()
    exit_process(cli())
