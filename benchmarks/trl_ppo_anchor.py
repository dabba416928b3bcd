"""The speed anchor: TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` (the last TRL release with a PPO trainer)
at the sizes of ``benchmarks/ppo_vs_trl.py``, which runs this file in its own virtual environment (it imports
nothing from this project). Writes ``{"seconds_per_iteration": [...], ...}`` to ``--out``.

The anchor is set up as TRL's own PPO example sets it up: a LoRA policy (its reference is the policy with the
adapter off), and a full reward model and a full value model in fp32, both initialised from the reward model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer


class IterationClock(TrainerCallback):
    """Wall seconds of every PPO update (rollout and optimisation), from the trainer's own step events."""

    def __init__(self):
        self.seconds: list[float] = []
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL rows {'prompt': [messages]}")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response_length", type=int, default=32)
    ap.add_argument("--learning_rate", type=float, default=1e-4)
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--lora_alpha", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [json.loads(line)["prompt"] for line in open(a.prompts) if line.strip()]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})

    with tempfile.TemporaryDirectory() as out_dir:
        config = PPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=a.batch,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=a.batch * a.iterations,
            response_length=a.response_length,
            temperature=0.7,
            learning_rate=a.learning_rate,
            stop_token="eos",
            missing_eos_penalty=1.0,
            num_sample_generations=0,  # no extra generation inside the timed loop
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            seed=a.seed,
            bf16=False,
        )
        policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
        reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
        for m in (reward, value):
            m.config.pad_token_id = tok.pad_token_id
        clock = IterationClock()
        trainer = PPOTrainer(
            args=config,
            processing_class=tok,
            model=policy,
            ref_model=None,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            peft_config=LoraConfig(
                r=a.lora_r,
                lora_alpha=a.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
            callbacks=[clock],
        )
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    with open(a.out, "w") as f:
        json.dump(
            {"seconds_per_iteration": clock.seconds, "train_seconds": total, "torch_threads": torch.get_num_threads()},
            f,
        )


if __name__ == "__main__":
    main()
