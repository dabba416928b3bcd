"""The ``rlhf`` console command: ``rlhf {sft,reward,ppo,eval,demo,verify} [flags | --config FILE.yaml]``."""

from __future__ import annotations

import importlib
import sys

from pipeline.allocator import restart_with_tuned_malloc

COMMANDS = {
    "sft": ("pipeline.stage_sft", "supervised fine-tuning with LoRA -> artifacts/sft"),
    "reward": ("pipeline.stage_reward", "reward-model training with LoRA -> artifacts/reward"),
    "ppo": ("pipeline.stage_ppo", "PPO with GAE (single process; use `accelerate launch` for more) -> artifacts/ppo"),
    "eval": ("pipeline.stage_eval", "side-by-side evaluation of base, SFT and PPO -> artifacts/eval"),
    "demo": ("pipeline.demo", "the whole chain on the embedded default"),
    "verify": ("pipeline.verify", "check every stage's weight files against their recorded sha256"),
}


def usage() -> str:
    lines = ["usage: rlhf COMMAND [--config FILE.yaml] [flags]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`rlhf COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `rlhf` program itself, not a call from Python
        restart_with_tuned_malloc()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
