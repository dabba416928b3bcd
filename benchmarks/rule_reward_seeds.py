"""How far the tiny-model learning test moves across seeds, estimators and precisions.

    .venv/bin/python benchmarks/rule_reward_seeds.py --estimators grpo --dtypes float32 bfloat16 --seeds 5 6 7 8 9
    .venv/bin/python benchmarks/rule_reward_seeds.py --estimators gae grpo --rollout_logprobs forward sampler
    .venv/bin/python benchmarks/rule_reward_seeds.py --summarize runs/a/rule_reward_seeds.json runs/b/...json

Runs ``tests/test_stage_ppo.py::test_learns_rule_reward``'s PPO run (a tiny LLaMA built from config, the reward
the share of lowercase letters in a response, 30 iterations) once per estimator, base dtype, source of the
rollout's log-probs (``--rollout_logprobs``) and seed, on the device the stage picks (the first GPU if there is
one), and prints the mean score of the first and last five iterations. The test asks the last five to beat the
first five by 0.25 at seed 3; this shows whether a run that misses it on other hardware or settings lies outside
the spread of seeds. Writes ``<out>/rule_reward_seeds.json``. ``--summarize`` reads such files instead and prints,
per estimator, dtype and source, the mean rise with a 95% t interval over seeds and the runs below the test's
0.25, and each source's difference from ``forward`` paired by seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from pipeline.stage_ppo import ROLLOUT_LOGPROBS
    from tests import test_stage_ppo as t

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", nargs="+", choices=list(t.RULE_REWARD_ESTIMATORS), default=["grpo"])
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[3, 4, 5])
    ap.add_argument("--rollout_logprobs", nargs="+", choices=ROLLOUT_LOGPROBS,
                    default=[t.RULE_REWARD_SETTINGS["rollout_logprobs"]], help="default: the test's")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1, as the test runs: rounding differs)")
    ap.add_argument("--out", type=Path, default=Path("runs/rule-reward-seeds"))
    ap.add_argument("--summarize", nargs="+", type=Path, help="rule_reward_seeds.json files to summarise; run none")
    a = ap.parse_args(argv)
    if a.summarize:
        summarize([r for f in a.summarize for r in json.loads(f.read_text())["runs"]])
        return 0

    import pytest
    import torch
    from accelerate.state import AcceleratorState

    from tests.conftest import make_tokenizer, prompt_rows, write_jsonl

    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)  # the thread count changes CPU rounding, and so the run's path
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    tok = make_tokenizer(a.out / "tokenizer")
    prompts = write_jsonl(a.out / "prompts.jsonl", prompt_rows(32))
    patch, results = pytest.MonkeyPatch(), []
    t.replace_reward(patch, t.letter_share)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    for estimator in a.estimators:
        for dtype, source in ((d, s) for d in a.dtypes for s in a.rollout_logprobs):
            for seed in a.seeds:
                AcceleratorState._reset_state(True)
                varied = {"seed": seed, "dtype": dtype, "mixed_precision": "bf16" if dtype == "bfloat16" else "no",
                          "rollout_logprobs": source}  # fmt: skip
                scores = t.rule_reward_scores(a.out / f"{estimator}-{dtype}-{source}-{seed}", tok, prompts,
                                              **{**t.RULE_REWARD_ESTIMATORS[estimator], **varied})  # fmt: skip
                first, last = t.first_and_last_five(scores)
                results.append({"estimator": estimator, "dtype": dtype, "rollout_logprobs": source, "seed": seed,
                                "first5": first, "last5": last, "rise": last - first})  # fmt: skip
                print(f"rule_reward_seeds: {estimator} {dtype} {source} seed {seed}: {first:.3f} -> {last:.3f} "
                      f"(rise {last - first:+.3f})", flush=True)  # fmt: skip
    patch.undo()
    torch.set_num_threads(threads)
    summary = {"device": device, "threads": a.threads, "runs": results}
    (a.out / "rule_reward_seeds.json").write_text(json.dumps(summary, indent=1))
    print(f"rule_reward_seeds: on {device}; wrote {a.out / 'rule_reward_seeds.json'}")
    return 0


def summarize(runs: list[dict]) -> None:
    """Mean rise [95% t interval] per (estimator, dtype, source) and each source minus ``forward``, paired by seed."""
    from benchmarks.quality import t_interval

    groups: dict[tuple, dict[int, float]] = {}
    for r in runs:
        key = (r["estimator"], r["dtype"], r.get("rollout_logprobs", "forward"))
        groups.setdefault(key, {})[r["seed"]] = r["rise"]

    def show(xs: list[float]) -> str:
        m, lo, hi = t_interval(xs)
        return f"{m:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "")

    for (estimator, dtype, source), rises in sorted(groups.items()):
        xs = list(rises.values())
        print(f"rule_reward_seeds: {estimator} {dtype} {source}: {len(xs)} seeds, mean rise {show(xs)}, "
              f"{sum(x <= 0.25 for x in xs)} at or below 0.25, lowest {min(xs):+.3f}")  # fmt: skip
        base = groups.get((estimator, dtype, "forward"))
        if source != "forward" and base:
            seeds = sorted(set(rises) & set(base))
            print(f"  minus forward, paired over {len(seeds)} seeds: {show([rises[s] - base[s] for s in seeds])}")


if __name__ == "__main__":
    sys.exit(main())
