"""A/B of the SFT stage's completion-position loss against TRL's fused-head loss.

    .venv/bin/python benchmarks/bench_sft_loss.py [--batches 3] [--repeats 2] [--bf16 true|false]

Builds the SFT trainer of the demo recipe (embedded model, LoRA r=16, batch 8), takes real
batches of the embedded SFT data, and times forward+backward of both ``compute_loss`` paths on
the same model and batches. Prints seconds per batch and the loss of each path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", choices=["true", "false"], default="true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from trl import ModelConfig, SFTConfig

    from pipeline.data import load_for
    from pipeline.embedded import resolve_model_path
    from pipeline.modeling import ensure_distinct_pad_token, load_tokenizer, lora_config
    from pipeline.stage_sft import completion_trainer_class

    path = resolve_model_path("embedded")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ensure_distinct_pad_token(tok, model)
    targs = SFTConfig(
        output_dir=str(Path("/tmp") / "bench_sft_loss"),
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        bf16=args.bf16 == "true",
        completion_only_loss=True,
        max_length=256,
    )
    peft = lora_config(ModelConfig(use_peft=True, lora_r=16, lora_alpha=32), "CAUSAL_LM")
    trainer = completion_trainer_class()(
        model=model,
        args=targs,
        processing_class=tok,
        peft_config=peft,
        train_dataset=load_for("sft", None, "train", None, 8 * args.batches),
    )
    it = iter(trainer.get_train_dataloader())
    batches = [next(it) for _ in range(args.batches)]
    for b in batches:
        print(f"batch {tuple(b['input_ids'].shape)}, {int((b['labels'] != -100).sum())} completion tokens")
    paths = {
        "completion positions (ours)": lambda m, b: trainer.compute_loss(m, b),
        "TRL fused head": lambda m, b: super(type(trainer), trainer).compute_loss(m, b),
    }
    for rep in range(args.repeats):
        for name, fn in paths.items():
            times = []
            for b in batches:
                trainer.model.zero_grad()
                t = time.perf_counter()
                with trainer.accelerator.autocast():
                    loss = fn(trainer.model, dict(b))
                loss.backward()
                times.append(time.perf_counter() - t)
            print(
                f"round {rep}  {name:28s} "
                + " ".join(f"{x:.2f}" for x in times)
                + f"  mean {sum(times) / len(times):.2f} s  (last loss {loss.item():.4f})"
            )


if __name__ == "__main__":
    main()
