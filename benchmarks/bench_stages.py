"""Throughput of the pieces that set the demo's wall time, on the embedded model.

    make bench                      # or: .venv/bin/python benchmarks/bench_stages.py --repeats 3

Prints one line per measurement (median of --repeats) and writes benchmarks/results.json:
generation tokens/s (sampled) in fp32 and under bf16 autocast at batch 16, and with bf16 weights
at batch 16 and 64 (the evaluation's setting); LoRA forward+backward seconds per SFT-sized batch
in fp32 and bf16 autocast; and, when an artifact directory with sft/ and reward/ exists, seconds
per PPO iteration (and episodes/s) with the demo recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.embedded import ensure_embedded_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--artifact_dir", default="artifacts")
    p.add_argument("--ppo_iterations", type=int, default=3)
    args = p.parse_args()
    out: dict[str, float] = {"torch_threads": torch.get_num_threads()}

    path = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    prompts = [[{"role": "user", "content": f"Explain topic number {i} in two sentences."}] for i in range(64)]
    new = 48
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(path).eval(),
        "bf16": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
    }
    for name, weights, autocast, batch in (
        ("fp32", "fp32", False, 16),
        ("bf16_autocast", "fp32", True, 16),
        ("bf16_weights", "bf16", False, 16),
        ("bf16_weights", "bf16", False, 64),
    ):
        enc = tok(
            [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts[:batch]],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )

        def gen(model=models[weights], enc=enc, autocast=autocast):
            torch.manual_seed(0)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.generate(
                    **enc,
                    do_sample=True,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    top_k=0,
                    pad_token_id=tok.pad_token_id,
                )

        secs = timeit(gen, args.repeats)
        out[f"generate_b{batch}_tokens_per_s_{name}"] = batch * new / secs
        print(
            f"generation, batch {batch} x {new} tokens, {name}: {batch * new / secs:.0f} tokens/s ({secs:.2f} s)",
            flush=True,
        )
    del models

    lm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    x = torch.randint(100, 40000, (8, 96))
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):

        def step(bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = lm(input_ids=x, labels=x).loss
            loss.backward()
            lm.zero_grad()

        secs = timeit(step, args.repeats)
        out[f"lora_fwd_bwd_b8x96_s_{name}"] = secs
        print(f"LoRA r=16 forward+backward, batch 8 x 96 tokens, {name}: {secs:.2f} s", flush=True)

    art = Path(args.artifact_dir)
    if (art / "sft" / "manifest.json").exists() and (art / "reward" / "manifest.json").exists():
        from pipeline.stage_ppo import cli

        with tempfile.TemporaryDirectory() as tmp:
            rc = cli(
                [
                    "--config",
                    "configs/ppo_demo.yaml",
                    "--artifact_dir",
                    tmp,
                    "--model_name_or_path",
                    str(art / "sft" / "model"),
                    "--reward_model_path",
                    str(art / "reward" / "model"),
                    "--num_iterations",
                    str(args.ppo_iterations),
                    "--sample_every",
                    "0",
                    "--save_every",
                    "1000",
                ]
            )
            if rc == 0:
                rows = [json.loads(line) for line in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()]
                secs = statistics.median(r["time/iteration_s"] for r in rows)
                episodes = rows[0]["episode"]  # after the first iteration = episodes per iteration
                out["ppo_seconds_per_iteration_demo_recipe"] = secs
                out["ppo_episodes_per_s_demo_recipe"] = episodes / secs
                print(
                    f"PPO demo recipe: {secs:.1f} s/iteration, {episodes / secs:.2f} episodes/s "
                    f"(median of {len(rows)})",
                    flush=True,
                )
    else:
        print(f"(no {art}/sft and {art}/reward: PPO timing skipped; run `make demo` first)")
    Path("benchmarks/results.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
