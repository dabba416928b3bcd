"""``rlhf demo``: SFT -> RM -> PPO -> evaluation on the embedded default, offline, on CPU.

Each stage runs in its own process with its recipe under ``configs/`` and is skipped when its manifest shows it
complete for the same inputs and config (``--force`` reruns every stage). Flags after the
command apply to every stage that knows them, e.g. ``rlhf demo --artifact_dir runs/a``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from pipeline.artifacts import REPO_ROOT
from pipeline.modeling import BF16_FLAG_STAGES, native_bf16_here

FORWARDED = (signal.SIGTERM, signal.SIGINT)
STEPS = [  # (title, module, recipe)
    ("SFT", "pipeline.stage_sft", "configs/sft_demo.yaml"),
    ("reward model", "pipeline.stage_reward", "configs/reward_demo.yaml"),
    ("PPO", "pipeline.stage_ppo", "configs/ppo_demo.yaml"),
    ("evaluation", "pipeline.stage_eval", "configs/eval_demo.yaml"),
]


def precision_flags() -> list[str]:
    """``--bf16 false`` for the recipes that ask for bf16 (SFT, reward, evaluation) where bf16 is not native,
    as PPO's ``--dtype auto`` decides for itself: the recipes stay the fast setting where it is fast."""
    return [] if native_bf16_here() else ["--bf16", "false"]


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM when the demo process dies, even by SIGKILL."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_stage(cmd: list[str]) -> int:
    """Run one stage's process to its end, with glibc's malloc tuned (``pipeline/allocator.py``): SIGTERM and
    SIGINT sent to the demo are passed on to it, and it never outlives the demo (it is terminated if the demo
    stops early, and gets SIGTERM if the demo dies)."""
    import subprocess

    from pipeline.allocator import tuned_env

    proc = subprocess.Popen(
        cmd, env=tuned_env(), preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None
    )
    previous = {s: signal.signal(s, lambda signum, _frame: proc.send_signal(signum)) for s in FORWARDED}
    try:
        rc = proc.wait()
        return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact_dir", default="artifacts")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--only", choices=["sft", "reward", "ppo", "eval"], help="run one stage of the demo")
    args = parser.parse_args(argv)
    names = ["sft", "reward", "ppo", "eval"]
    timings = []
    fp32 = precision_flags()
    if fp32:
        print(
            "demo: this machine has no native bf16 matmul (AVX512-BF16, AMX or a bf16 GPU): SFT, the reward model "
            "and the evaluation run in fp32 (--bf16 false; emulated bf16 is about 150x slower), PPO picks fp32 "
            "itself (--dtype auto)",
            flush=True,
        )
    for name, (title, module, recipe) in zip(names, STEPS):
        if args.only and args.only != name:
            continue
        print(f"\n=== {title} ({recipe}) ===", flush=True)
        stage_argv = ["--config", str(REPO_ROOT / recipe), "--artifact_dir", args.artifact_dir]
        if args.force:
            stage_argv.append("--force")
        if module in BF16_FLAG_STAGES:
            stage_argv += fp32
        t = time.perf_counter()
        # A fresh process per stage: each sets up its own Accelerate state (precision, processes).
        rc = run_stage([sys.executable, "-m", module, *stage_argv])
        timings.append((title, time.perf_counter() - t))
        if rc != 0:
            print(
                f"demo: the {title} stage failed (exit {rc}); fix the error above and re-run `make demo` "
                "(completed stages are skipped, an interrupted PPO run continues)",
                file=sys.stderr,
            )
            return rc
    print("\n" + "  ".join(f"{title}: {secs / 60:.1f} min" for title, secs in timings))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
