"""``rlhf demo``: SFT -> RM -> PPO -> evaluation on the embedded default, offline, on CPU.

Each stage runs in its own process with its recipe under ``configs/`` and is skipped when its manifest shows it
complete for the same inputs and config (``--force`` reruns every stage). Flags after the
command apply to every stage that knows them, e.g. ``rlhf demo --artifact_dir runs/a``.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.artifacts import REPO_ROOT

STEPS = [  # (title, module, recipe)
    ("SFT", "pipeline.stage_sft", "configs/sft_demo.yaml"),
    ("reward model", "pipeline.stage_reward", "configs/reward_demo.yaml"),
    ("PPO", "pipeline.stage_ppo", "configs/ppo_demo.yaml"),
    ("evaluation", "pipeline.stage_eval", "configs/eval_demo.yaml"),
]


def cli(argv: list[str] | None = None) -> int:
    import subprocess

    parser = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact_dir", default="artifacts")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--only", choices=["sft", "reward", "ppo", "eval"], help="run one stage of the demo")
    args = parser.parse_args(argv)
    names = ["sft", "reward", "ppo", "eval"]
    timings = []
    for name, (title, module, recipe) in zip(names, STEPS):
        if args.only and args.only != name:
            continue
        print(f"\n=== {title} ({recipe}) ===", flush=True)
        stage_argv = ["--config", str(REPO_ROOT / recipe), "--artifact_dir", args.artifact_dir]
        if args.force:
            stage_argv.append("--force")
        t = time.perf_counter()
        # A fresh process per stage: each sets up its own Accelerate state (precision, processes).
        rc = subprocess.run([sys.executable, "-m", module, *stage_argv], check=False).returncode
        timings.append((title, time.perf_counter() - t))
        if rc != 0:
            print(
                f"demo: the {title} stage failed (exit {rc}); fix the error above and re-run `make demo` "
                "(completed stages are skipped)",
                file=sys.stderr,
            )
            return rc
    print("\n" + "  ".join(f"{title}: {secs / 60:.1f} min" for title, secs in timings))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
