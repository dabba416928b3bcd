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

Every run is a normal artifact directory under ``--out`` (``a/seed-S/<recipe>/``, the first recipe's holding
that seed's SFT and reward model as a demo directory does; ``a/seed-S/sft_matched/``), so a completed stage is
skipped on a rerun and an interrupted one continues: run it in the background and rerun it after a kill.
The main runs of every seed come first, then the compute-matched SFT runs. ``--max_runs N`` stops after N
stage runs; ``--summarize_only`` writes the table from whatever is complete.

The summary (``quality.json`` and ``quality.md`` in ``--out``) gives per
recipe, over seeds, the mean and a 95% t interval of: gold score and its gain over SFT (same seed), gold win
rate against SFT, reward-model win rate against SFT, the reward model's agreement with the gold judge on those
pairs, KL to SFT, gold on the held-out phrasings and its gain,
and the RL stage's training time; for the final policy and for the checkpoint the evaluation recommends
without the gold judge (``--kl_budget``).

Two data settings (``--setting``):

- ``a``: the embedded data as the demo uses it;
- ``b``: scarce demonstrations. SFT trains on ``sft_scarce.jsonl`` (a fifth of the demonstrations, the split
  ``train_scarce``) for ``--scarce_sft_epochs`` epochs; the reward model and PPO use the comparisons and
  prompts of the questions SFT never saw (``pref_scarce.jsonl``, ``ppo_prompts_scarce.jsonl``,
  ``data/embedded/README.md``). Its compute-matched SFT trains more epochs on the same demonstrations, so it
  shows whether SFT had converged. Runs live under ``b/seed-S/``, the summary in ``quality-b.json`` and
  ``quality-b.md``.
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

from pipeline.demo import precision_flags  # noqa: E402
from pipeline.modeling import BF16_FLAG_STAGES  # noqa: E402

# Two-sided 95% Student t quantiles by degrees of freedom (a table: no scipy in the project's dependencies).
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
}


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
    def __init__(self, max_runs: int | None, log: Path, trust_complete: bool = False):
        self.max_runs, self.runs, self.log, self.trust_complete = max_runs, 0, log, trust_complete

    def stage(self, art: Path, module: str, config: str, *extra: str) -> None:
        """Run one stage (a no-op when its manifest says complete for these settings)."""
        stage = {"sft": "sft", "reward": "reward", "ppo": "ppo", "eval": "eval"}[module.rsplit("_", 1)[-1]]
        if self.trust_complete and complete(art, stage):
            print(f"quality: {art.name}/{stage} is complete: kept as it is (--trust_complete)", flush=True)
            return
        if self.max_runs is not None and self.runs >= self.max_runs:
            print(f"quality: stopping after {self.runs} stage runs (--max_runs); rerun to continue", flush=True)
            sys.exit(0)
        cmd = [sys.executable, "-m", module, "--config", str(REPO / config), "--artifact_dir", str(art), *extra]
        if module in BF16_FLAG_STAGES:  # fp32 where bf16 is emulated, as `rlhf demo` does
            cmd += precision_flags()
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


def agreement(policy: dict, sft: dict) -> float | None:
    """On the prompts where the gold judge prefers the policy's response or SFT's, how often the reward model
    prefers the same one (its accuracy on the policies' own samples; pipeline.eval_report)."""
    from pipeline.eval_report import reward_gold_agreement

    agree, n = reward_gold_agreement(policy["reward"], sft["reward"], policy["gold"], sft["gold"])
    return float(agree.mean()) if n else None


def compare(policy: dict, sft: dict) -> dict:
    """One seed's numbers for a policy against that seed's SFT model (same prompts, same sampling seed)."""
    out = {
        "gold": mean(policy["gold"]),
        "gold_gain": mean(policy["gold"]) - mean(sft["gold"]),
        "gold_win_rate": win_rate(policy["gold"], sft["gold"]),
        "rm_win_rate": win_rate(policy["reward"], sft["reward"]),
        "rm_gold_agreement": agreement(policy, sft),
        "kl": mean(policy["kl"]),
        "gold_rephrased": mean(policy["gold_rephrased"]),
    }
    if policy["gold_rephrased"] and sft["gold_rephrased"]:
        out["gold_rephrased_gain"] = out["gold_rephrased"] - mean(sft["gold_rephrased"])
    return out


def run(args) -> None:
    """Run every stage, main runs of every seed first, then the compute-matched SFT runs (the longest)."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.max_runs, out / "stages.log", args.trust_complete)
    eval_flags = ("--kl_budget", str(args.kl_budget))
    first = args.recipes[0]
    sft_data, rl_data = setting_flags(args)
    for seed in args.seeds:
        root, s = seed_dir(out, args, seed), ("--seed", str(seed))
        main_dir = root / first  # SFT and reward model live with the first recipe's run, as in a demo
        runner.stage(main_dir, "pipeline.stage_sft", "configs/sft_demo.yaml", *s, *sft_data)
        runner.stage(main_dir, "pipeline.stage_reward", "configs/reward_demo.yaml", *s, *rl_data)
        for recipe in args.recipes:
            d = root / recipe
            if d != main_dir:
                link_inputs(main_dir, d)
            extra = []
            if "reward_aggregation" in yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text()):
                # An ensemble recipe: this seed's reward model plus members trained with other seeds on the
                # same SFT model, LoRA adapters on one base.
                members = [str(d / "reward" / "adapter")]
                for i in range(1, args.ensemble_members):
                    m = root / f"reward-member-{i}"
                    runner.stage(m, "pipeline.stage_reward", "configs/reward_demo.yaml", "--model_name_or_path",
                                 str(main_dir / "sft" / "model"), "--seed", str(seed + 1000 * i),
                                 *rl_data)  # fmt: skip
                    members.append(str(m / "reward" / "adapter"))
                extra = ["--reward_model_path", *members]
            runner.stage(d, "pipeline.stage_ppo", f"configs/{recipe}.yaml", *s, *extra, *rl_data)
            runner.stage(d, "pipeline.stage_eval", "configs/eval_demo.yaml", *eval_flags)
    for seed in args.seeds:
        # Compute-matched SFT: the demo's SFT recipe plus the steps the first RL recipe's training time buys at
        # the SFT stage's measured seconds per step (the first recipe, so adding one later changes nothing).
        root, s = seed_dir(out, args, seed), ("--seed", str(seed))
        sft_m, ppo_m = manifest(root / first, "sft")["metrics"], manifest(root / first, "ppo")["metrics"]
        rl_s = ppo_m["seconds_per_iteration"] * ppo_m["iterations"]
        steps = args.matched_steps or sft_m["train_steps"] + round(
            rl_s / (sft_m["train_runtime_s"] / sft_m["train_steps"])
        )
        matched = root / "sft_matched"
        runner.stage(matched, "pipeline.stage_sft", "configs/sft_demo.yaml", *s, *sft_data, "--max_steps", str(steps))
        link_inputs(root / first, matched, ("reward",))
        runner.stage(matched, "pipeline.stage_eval", "configs/eval_demo.yaml", "--checkpoints", "sft", *eval_flags)


def seed_dir(out: Path, args, seed: int) -> Path:
    """Where one seed's runs of ``--setting`` live: ``<out>/<setting>/seed-<seed>/``."""
    return out / args.setting / f"seed-{seed}"


def setting_flags(args) -> tuple[list[str], list[str]]:
    """The data flags of ``--setting``: (SFT's, the reward model's and PPO's)."""
    if args.setting == "a":
        return [], []
    split = ["--dataset_train_split", "train_scarce"]
    return [*split, "--max_steps", "-1", "--num_train_epochs", str(args.scarce_sft_epochs)], split


def complete(d: Path, stage: str) -> bool:
    m = manifest(d, stage)
    return bool(m) and m.get("status") == "complete"


def collect(args) -> dict:
    """Every finished run's numbers, per seed, from the artifact directories (whatever is complete)."""
    out = Path(args.out).resolve()
    first = args.recipes[0]
    per_seed = {}
    for seed in args.seeds:
        root = seed_dir(out, args, seed)
        if not complete(root / first, "eval"):
            continue
        sft_eval = eval_row(root / first, "sft")
        sft_m = manifest(root / first, "sft")["metrics"]
        seed_out = {"sft": {"gold": mean(sft_eval["gold"]), "gold_rephrased": mean(sft_eval["gold_rephrased"]),
                            "train_s": sft_m["train_runtime_s"], "steps": sft_m["train_steps"]}}  # fmt: skip
        for recipe in args.recipes:
            d = root / recipe
            if not complete(d, "eval"):
                continue
            ppo_m = manifest(d, "ppo")["metrics"]
            pick = json.loads((d / "eval" / "report.json").read_text())["recommended"]["name"] or "ppo"
            seed_out[recipe] = {
                "final": compare(eval_row(d, "ppo"), sft_eval),
                "recommended": {"checkpoint": pick, **compare(eval_row(d, pick), sft_eval)},
                "rl_train_s": ppo_m["seconds_per_iteration"] * ppo_m["iterations"],
            }
        matched = root / "sft_matched"
        if complete(matched, "eval"):
            steps = manifest(matched, "sft")["metrics"]["train_steps"]
            row = {**compare(eval_row(matched, "sft"), sft_eval), "kl": None}  # its KL is to itself, not to SFT
            seed_out["sft_matched"] = {"final": row, "steps": steps,
                                       "train_s": manifest(matched, "sft")["metrics"]["train_runtime_s"]}  # fmt: skip
        per_seed[seed] = seed_out
    return summarize(per_seed, args)


KEYS = ["gold", "gold_gain", "gold_win_rate", "rm_win_rate", "rm_gold_agreement", "kl", "gold_rephrased",
        "gold_rephrased_gain"]  # fmt: skip


def summarize(per_seed: dict, args) -> dict:
    rows = {}
    for recipe in list(args.recipes) + ["sft_matched"]:
        for which in ("final", "recommended") if recipe != "sft_matched" else ("final",):
            done = [s for s in per_seed if recipe in per_seed[s]]
            if not done:
                continue
            vals = [per_seed[s][recipe][which] for s in done]
            row = {k: t_interval([v.get(k) for v in vals]) for k in KEYS}
            row["seeds"] = done
            if recipe != "sft_matched":
                row["rl_train_s"] = t_interval([per_seed[s][recipe]["rl_train_s"] for s in done])
            rows[f"{recipe} ({which})" if recipe != "sft_matched" else "SFT, compute-matched"] = row
    sft = {k: t_interval([per_seed[s]["sft"][k] for s in per_seed]) for k in ("gold", "gold_rephrased")}
    return {"seeds": list(per_seed), "per_seed": per_seed, "sft": sft, "summary": rows, "kl_budget": args.kl_budget}


def fmt(ci, digits=3) -> str:
    m, lo, hi = ci
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" if lo is None else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(result: dict) -> str:
    head = ["run", "gold", "gain over SFT", "gold win vs SFT", "RM win vs SFT", "RM agrees with gold", "KL to SFT",
            "gold, held-out phrasing", "gain, held-out phrasing", "RL training s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sft = result["sft"]
    lines.append(
        f"| SFT (demo), {len(result['seeds'])} seeds | {fmt(sft['gold'])} | | | | | 0 "
        f"| {fmt(sft['gold_rephrased'])} | | |"
    )
    for name, row in result["summary"].items():
        cells = [fmt(row[k]) for k in KEYS] + [fmt(row.get("rl_train_s", (None, None, None)), 0)]
        lines.append(f"| {name}, {len(row.get('seeds', []))} seeds | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean over seeds ({', '.join(map(str, result['seeds']))}; each row names its own) with a 95% t "
                 "interval over seeds (none for one seed). "
                 f"'recommended': the checkpoint the evaluation picks without the gold judge (KL budget "
                 f"{result['kl_budget']} nats). 'RM agrees with gold': on the prompts where the gold judge prefers "
                 "the run's response or SFT's, how often the reward model prefers the same one.")  # fmt: skip
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
    ap.add_argument(
        "--trust_complete",
        action="store_true",
        help="keep every complete stage as it is, even one whose fingerprint differs (made by an "
        "earlier version of the code, or by `make demo` moved into place)",
    )
    ap.add_argument(
        "--setting", choices=["a", "b"], default="a", help="a: the embedded data; b: scarce demonstrations"
    )
    ap.add_argument(
        "--scarce_sft_epochs", type=int, default=5, help="setting b: SFT epochs over the scarce demonstrations"
    )
    ap.add_argument("--summarize_only", action="store_true", help="write the table from what is complete; run nothing")
    ap.add_argument("--max_runs", type=int, default=None, help="stop after N stage runs (rerun to continue)")
    args = ap.parse_args(argv)
    for recipe in args.recipes:
        if not (REPO / "configs" / f"{recipe}.yaml").is_file():
            print(f"error: no configs/{recipe}.yaml; name a recipe under configs/", file=sys.stderr)
            return 2
    if not args.summarize_only:
        run(args)
    result = collect(args)
    out = Path(args.out)
    name = "quality" if args.setting == "a" else f"quality-{args.setting}"
    (out / f"{name}.json").write_text(json.dumps({"setting": args.setting, **result}, indent=1))
    table = markdown(result)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
