"""Does grouping preference pairs by length change the reward model? And how much padding does it save?

    .venv/bin/python benchmarks/reward_grouping.py --source runs/demo --out runs/reward-grouping --seeds 42 1 2

For every seed, trains the reward model of ``configs/reward_demo.yaml`` on ``--source``'s SFT model twice,
with transformers' random batches (``--train_sampling_strategy random``) and with length-grouped batches
(``group_by_length``), alternating, each in its own artifact directory under ``--out``
(``<strategy>-seed-S/``, the SFT stage hard-linked from ``--source``). A completed run is kept on a rerun, so
run it in the background and rerun it after a kill.

Prints and writes ``reward_grouping.json``: per strategy, over seeds, the held-out pairwise accuracy and
margin (mean and 95% t interval), the training time, and the tokens the batches held, padding included,
against the tokens of the pairs themselves (counted from the training order the sampler gives, outside the
timed runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.quality import link_inputs, t_interval  # noqa: E402
from pipeline.demo import precision_flags  # noqa: E402

STRATEGIES = ("random", "group_by_length")


def train(art: Path, strategy: str, seed: int, log: Path) -> None:
    if (art / "reward" / "manifest.json").exists():
        print(f"reward_grouping: {art.name} is complete: kept", flush=True)
        return
    cmd = [sys.executable, "-m", "pipeline.stage_reward", "--config", str(REPO / "configs" / "reward_demo.yaml"),
           "--artifact_dir", str(art), "--seed", str(seed), "--train_sampling_strategy", strategy,
           *precision_flags()]  # fmt: skip
    print(f"reward_grouping: {' '.join(cmd[2:])}", flush=True)
    t = time.perf_counter()
    with log.open("a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        sys.exit(f"reward_grouping: the reward stage failed (exit {rc}); see {log}")
    print(f"reward_grouping:   done in {time.perf_counter() - t:.0f}s", flush=True)


def batch_tokens(sft: Path, strategies: tuple[str, ...], seeds: list[int]) -> dict[tuple[str, int], dict]:
    """Per (strategy, seed): tokens in the recipe's batches (each pair's two replies padded to the batch's
    longest) and in the pairs themselves, over as many batches as the recipe trains on, as the trainer's sampler
    draws them (outside the timed run, so not necessarily its very draw). The SFT model, its tokenizer and the
    pairs load once."""
    import tempfile

    import yaml
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig

    from pipeline.config import StageArguments
    from pipeline.modeling import load_tokenizer
    from pipeline.stage_reward import load_pairs, reward_trainer_class

    recipe = yaml.safe_load((REPO / "configs" / "reward_demo.yaml").read_text())
    tok = load_tokenizer(str(sft))
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)  # only batches are drawn
    model.config.pad_token_id = tok.pad_token_id
    pairs = load_pairs(StageArguments())[0]
    trainer_class, out = reward_trainer_class(), {}
    for strategy in strategies:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                targs = RewardConfig(output_dir=tmp, per_device_train_batch_size=recipe["per_device_train_batch_size"],
                                     max_length=recipe["max_length"], seed=seed, train_sampling_strategy=strategy,
                                     use_cpu=True, report_to="none", bf16=False)  # fmt: skip
                trainer = trainer_class(model=model, args=targs, train_dataset=pairs, processing_class=tok)
                set_seed(seed)  # as Trainer.train seeds before it builds the dataloader
                padded = real = 0
                for step, batch in enumerate(trainer.get_train_dataloader()):
                    if step == recipe["max_steps"]:
                        break
                    padded += batch["input_ids"].numel()
                    real += int(batch["attention_mask"].sum())
            out[(strategy, seed)] = {"batch_tokens": padded, "pair_tokens": real, "padding_share": 1 - real / padded}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="an artifact directory with a complete sft/ stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "reward_grouping.log"
    for seed in a.seeds:
        for strategy in STRATEGIES:
            art = out / f"{strategy}-seed-{seed}"
            link_inputs(Path(a.source), art, stages=("sft",))
            train(art, strategy, seed, log)
    result = {"command": "python benchmarks/reward_grouping.py " + " ".join(argv or sys.argv[1:]), "strategies": {}}
    tokens = batch_tokens(Path(a.source) / "sft" / "model", STRATEGIES, a.seeds)
    for strategy in STRATEGIES:
        runs = []
        for seed in a.seeds:
            art = out / f"{strategy}-seed-{seed}"
            m = json.loads((art / "reward" / "manifest.json").read_text())["metrics"]
            runs.append({"seed": seed, "accuracy": m["test"]["accuracy"], "margin": m["test"]["margin_mean"],
                         "train_runtime_s": m["train_runtime_s"], **tokens[(strategy, seed)]})  # fmt: skip
        summary = {k: t_interval([r[k] for r in runs]) for k in ("accuracy", "margin", "train_runtime_s")}
        result["strategies"][strategy] = {"runs": runs, "summary": summary}
        acc, lo, hi = summary["accuracy"]
        band = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        print(f"reward_grouping {strategy}: held-out accuracy {acc:.3f}{band}; train "
              f"{[round(r['train_runtime_s']) for r in runs]} s; padding "
              f"{[round(r['padding_share'], 3) for r in runs]}", flush=True)  # fmt: skip
    (out / "reward_grouping.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
