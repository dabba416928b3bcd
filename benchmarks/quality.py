"""Multi-seed quality benchmark: does the RL stage beat SFT, and SFT given the same extra compute?

    .venv/bin/python benchmarks/quality.py --out runs/quality                       # 3 seeds, the demo's PPO recipe
    .venv/bin/python benchmarks/quality.py --out runs/quality --recipes ppo_demo ppo_rloo_demo --seeds 42 1 2 3 4

For every seed (it seeds the SFT, reward-model and RL stages alike), on the embedded task:

1. ``sft``: SFT with ``configs/sft_demo.yaml``, then the reward model with ``configs/reward_demo.yaml``;
2. each RL recipe ``configs/<recipe>.yaml`` on that SFT and reward model;
   A recipe whose config sets ``reward_aggregation`` (``configs/ppo_ensemble_demo.yaml``) is scored by an
   ensemble: that seed's reward model plus ``--ensemble_members - 1`` more trained on the same SFT model with
   other seeds;
3. ``sft_matched``: SFT from scratch with the demo recipe plus as many extra steps as the first RL recipe's
   training time buys at the SFT stage's measured seconds per step (compute-matched SFT);
4. ``configs/eval_demo.yaml`` on each (sampled decoding, 200 held-out prompts, the held-out phrasings too).

Every run is a normal artifact directory under ``--out``, so a completed stage is skipped on a rerun and an
interrupted one continues: run it in the background and rerun it after a kill. ``--max_runs N`` stops after
N stage runs, for running in chunks. The summary (``quality.json`` and ``quality.md`` in ``--out``) gives per
recipe, over seeds, the mean and a 95% t interval of: gold score and its gain over SFT (same seed), gold win
rate against SFT, reward-model win rate against SFT, KL to SFT, gold on the held-out phrasings and its gain,
and the RL stage's training time; for the final policy and for the checkpoint the evaluation recommends
without the gold judge (``--kl_budget``).

Setting (b) of the quality issue (scarce demonstrations) is not implemented here yet.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Two-sided 95% Student t quantiles by degrees of freedom (a table: no scipy in the project's dependencies).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(xs: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the 95% t interval of the mean over seeds; no interval for one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None, None
    half = T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def manifest(art: Path, stage: str) -> dict | None:
    path = art / stage / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


class Runner:
    def __init__(self, max_runs: int | None, log: Path):
        self.max_runs, self.runs, self.log = max_runs, 0, log

    def stage(self, art: Path, module: str, config: str, *extra: str) -> None:
        """Run one stage (a no-op when its manifest says complete for these settings)."""
        if self.max_runs is not None and self.runs >= self.max_runs:
            print(f"quality: stopping after {self.runs} stage runs (--max_runs); rerun to continue", flush=True)
            sys.exit(0)
        cmd = [sys.executable, "-m", module, "--config", str(REPO / config), "--artifact_dir", str(art), *extra]
        print(f"quality: {' '.join(cmd[2:])}", flush=True)
        t = time.perf_counter()
        with self.log.open("a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if rc != 0:
            sys.exit(f"quality: {module} failed (exit {rc}); see {self.log}")
        self.runs += 1
        print(f"quality:   done in {time.perf_counter() - t:.0f}s", flush=True)


def link_inputs(src: Path, dst: Path, stages=("sft", "reward")) -> None:
    """``dst`` gets ``src``'s completed stages as hard links (the same SFT and reward model, no copy)."""
    from pipeline.artifacts import link_tree

    for s in stages:
        if not (dst / s).exists():
            dst.mkdir(parents=True, exist_ok=True)
            link_tree(src / s, dst / s)


def eval_row(art: Path, policy: str) -> dict:
    """Per-prompt gold and reward of ``policy`` (``sft``, ``ppo`` or a PPO checkpoint) in ``art``'s evaluation."""
    results = json.loads((art / "eval" / "results.json").read_text())
    ck = results["checkpoints"][policy]
    return {
        "gold": ck["sampled"]["gold"],
        "reward": ck["sampled"]["reward"],
        "kl": ck["sampled"]["kl_to_sft"],
        "gold_rephrased": (ck.get("rephrased") or {}).get("gold"),
    }


def mean(xs):
    return None if not xs else statistics.fmean(xs)


def win_rate(a: list[float], b: list[float]) -> float:
    return statistics.fmean(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))


def compare(policy: dict, sft: dict) -> dict:
    """One seed's numbers for a policy against that seed's SFT model (same prompts, same sampling seed)."""
    out = {
        "gold": mean(policy["gold"]),
        "gold_gain": mean(policy["gold"]) - mean(sft["gold"]),
        "gold_win_rate": win_rate(policy["gold"], sft["gold"]),
        "rm_win_rate": win_rate(policy["reward"], sft["reward"]),
        "kl": mean(policy["kl"]),
        "gold_rephrased": mean(policy["gold_rephrased"]),
    }
    if policy["gold_rephrased"] and sft["gold_rephrased"]:
        out["gold_rephrased_gain"] = out["gold_rephrased"] - mean(sft["gold_rephrased"])
    return out


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.max_runs, out / "stages.log")
    eval_flags = ("--kl_budget", str(args.kl_budget))
    per_seed = {}
    for seed in args.seeds:
        root = out / "a" / f"seed-{seed}"
        base = root / "sft"
        s = ("--seed", str(seed))
        runner.stage(base, "pipeline.stage_sft", "configs/sft_demo.yaml", *s)
        runner.stage(base, "pipeline.stage_reward", "configs/reward_demo.yaml", *s)
        runner.stage(base, "pipeline.stage_eval", "configs/eval_demo.yaml", "--checkpoints", "sft", *eval_flags)
        sft_m = manifest(base, "sft")["metrics"]
        sft_steps = sft_m["train_steps"]
        seconds_per_step = sft_m["train_runtime_s"] / sft_steps
        sft_eval = eval_row(base, "sft")
        seed_out = {"sft": {"gold": mean(sft_eval["gold"]), "gold_rephrased": mean(sft_eval["gold_rephrased"]),
                            "train_s": sft_m["train_runtime_s"], "steps": sft_steps}}  # fmt: skip
        rl_seconds = []
        for recipe in args.recipes:
            d = root / recipe
            link_inputs(base, d)
            extra = []
            if "reward_aggregation" in yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text()):
                # An ensemble recipe: this seed's reward model plus members trained with other seeds on the
                # same SFT model, LoRA adapters on one base.
                members = [str(d / "reward" / "adapter")]
                for i in range(1, args.ensemble_members):
                    m = root / f"reward-member-{i}"
                    runner.stage(m, "pipeline.stage_reward", "configs/reward_demo.yaml", "--model_name_or_path",
                                 str(base / "sft" / "model"), "--seed", str(seed + 1000 * i))  # fmt: skip
                    members.append(str(m / "reward" / "adapter"))
                extra = ["--reward_model_path", *members]
            runner.stage(d, "pipeline.stage_ppo", f"configs/{recipe}.yaml", *s, *extra)
            runner.stage(
                d, "pipeline.stage_eval", "configs/eval_demo.yaml", "--checkpoints", "sft", "ppo", *eval_flags
            )
            ppo_m = manifest(d, "ppo")["metrics"]
            train_s = ppo_m["seconds_per_iteration"] * ppo_m["iterations"]
            rl_seconds.append(train_s)
            report = json.loads((d / "eval" / "report.json").read_text())
            pick = report["recommended"]["name"] or "ppo"
            seed_out[recipe] = {
                "final": compare(eval_row(d, "ppo"), sft_eval),
                "recommended": {"checkpoint": pick, **compare(eval_row(d, pick), sft_eval)},
                "rl_train_s": train_s,
            }
        # Compute-matched SFT: the demo's SFT recipe plus the steps the first RL recipe's training time buys
        # (the first, so that adding a recipe later does not change a finished baseline).
        extra = round(rl_seconds[0] / seconds_per_step) if rl_seconds else 0
        matched = root / "sft_matched"
        steps = args.matched_steps or int(sft_steps) + extra
        runner.stage(matched, "pipeline.stage_sft", "configs/sft_demo.yaml", *s, "--max_steps", str(steps))
        link_inputs(base, matched, ("reward",))
        runner.stage(matched, "pipeline.stage_eval", "configs/eval_demo.yaml", "--checkpoints", "sft", *eval_flags)
        seed_out["sft_matched"] = {"final": compare(eval_row(matched, "sft"), sft_eval), "steps": steps}
        per_seed[seed] = seed_out
    return summarize(per_seed, args)


KEYS = ["gold", "gold_gain", "gold_win_rate", "rm_win_rate", "kl", "gold_rephrased", "gold_rephrased_gain"]


def summarize(per_seed: dict, args) -> dict:
    rows = {}
    for recipe in list(args.recipes) + ["sft_matched"]:
        for which in ("final", "recommended") if recipe != "sft_matched" else ("final",):
            vals = [per_seed[s][recipe][which] for s in per_seed]
            row = {k: t_interval([v.get(k) for v in vals]) for k in KEYS}
            if recipe != "sft_matched":
                row["rl_train_s"] = t_interval([per_seed[s][recipe]["rl_train_s"] for s in per_seed])
            rows[f"{recipe} ({which})" if recipe != "sft_matched" else "SFT, compute-matched"] = row
    sft = {k: t_interval([per_seed[s]["sft"][k] for s in per_seed]) for k in ("gold", "gold_rephrased")}
    return {"seeds": list(per_seed), "per_seed": per_seed, "sft": sft, "summary": rows, "kl_budget": args.kl_budget}


def fmt(ci, digits=3) -> str:
    m, lo, hi = ci
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" if lo is None else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(result: dict) -> str:
    head = ["run", "gold", "gain over SFT", "gold win vs SFT", "RM win vs SFT", "KL to SFT", "gold, held-out phrasing",
            "gain, held-out phrasing", "RL training s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sft = result["sft"]
    lines.append(f"| SFT (demo) | {fmt(sft['gold'])} | | | | 0 | {fmt(sft['gold_rephrased'])} | | |")
    for name, row in result["summary"].items():
        cells = [fmt(row[k]) for k in KEYS] + [fmt(row.get("rl_train_s", (None, None, None)), 0)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = len(result["seeds"])
    lines.append("")
    lines.append(f"Mean over {n} seeds ({', '.join(map(str, result['seeds']))}) with a 95% t interval over seeds. "
                 f"'recommended': the checkpoint the evaluation picks without the gold judge (KL budget "
                 f"{result['kl_budget']} nats).")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quality", help="where the artifact directories and the summary go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["ppo_demo"], help="RL recipes: configs/<recipe>.yaml")
    ap.add_argument(
        "--ensemble_members",
        type=int,
        default=3,
        help="reward models per ensemble recipe (one whose config sets reward_aggregation)",
    )
    ap.add_argument("--kl_budget", type=float, default=4.0, help="the evaluation's recommendation budget (nats)")
    ap.add_argument(
        "--matched_steps",
        type=int,
        default=None,
        help="SFT steps of the compute-matched run (default: the demo's plus what the RL time buys)",
    )
    ap.add_argument("--max_runs", type=int, default=None, help="stop after N stage runs (rerun to continue)")
    args = ap.parse_args(argv)
    for recipe in args.recipes:
        if not (REPO / "configs" / f"{recipe}.yaml").is_file():
            print(f"error: no configs/{recipe}.yaml; name a recipe under configs/", file=sys.stderr)
            return 2
    result = run(args)
    out = Path(args.out)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
