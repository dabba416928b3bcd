"""A/B of rollout sampling: through PEFT's unmerged LoRA layers vs a merged copy (``MergedPolicy``),
each with ``torch.multinomial`` (``do_sample=True``), and the merged copy with inverse-CDF sampling
(``pipeline/sampling.py``, what the PPO stage and the evaluation use).

    .venv/bin/python benchmarks/bench_ppo_generation.py [--policy PATH] [--adapter PATH] [--batch 32] [--repeats 2]

Loads the policy as the PPO stage does (bf16 base, float32 LoRA, bf16 autocast), takes the first
``--batch`` PPO prompts of the embedded task and samples ``--new_tokens`` tokens with each path,
same seed. ``--adapter`` loads a trained policy adapter (e.g. ``<artifact_dir>/ppo/policy_adapter``);
without it the LoRA weights are random, so that the merged copy has a non-zero delta to carry.
Prints seconds per batch for each path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="embedded", help="policy base (default: the embedded model)")
    parser.add_argument("--adapter", default=None, help="a saved policy adapter (default: random LoRA weights)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_for
    from pipeline.embedded import resolve_model_path
    from pipeline.modeling import ensure_distinct_pad_token, load_tokenizer
    from pipeline.ppo.generation import MergedPolicy
    from pipeline.sampling import sampling_kwargs

    acc = Accelerator(cpu=True, mixed_precision="bf16")
    path = resolve_model_path(args.policy)
    tok = load_tokenizer(path, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ensure_distinct_pad_token(tok, base)
    if args.adapter:
        policy = PeftModel.from_pretrained(base, args.adapter)
    else:
        policy = get_peft_model(
            base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        )
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
    for n, p in policy.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    policy.eval()
    sampler = MergedPolicy(policy)
    t = time.perf_counter()
    sampler.sync()
    print(f"merge (sync): {time.perf_counter() - t:.2f}s")

    prompts = [r["prompt"] for r in load_for("prompt", None, "train", None, args.batch)]
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    common = dict(max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    multinomial = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    paths = {
        "PEFT, multinomial": (policy, multinomial),
        "merged, multinomial": (sampler, multinomial),
        "merged, inverse CDF": (sampler, sampling_kwargs(0.7)),
    }
    for rep in range(args.repeats):
        for name, (model, how) in paths.items():
            torch.manual_seed(rep)
            t = time.perf_counter()
            with torch.no_grad(), acc.autocast():
                out = model.generate(**enc, **how, **common)[:, enc["input_ids"].shape[1] :]
            print(
                f"round {rep}  {name:20s} {time.perf_counter() - t:6.1f}s  ({args.batch} x {out.shape[1]} new tokens)",
                flush=True,
            )


if __name__ == "__main__":
    main()
