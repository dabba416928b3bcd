"""``rlhf verify``: check every completed stage's weight files against the sizes and sha256 hashes its
manifest recorded (loading checks only the sizes; this reads every byte).

    rlhf verify --artifact_dir artifacts
"""

from __future__ import annotations

import argparse
import sys

from pipeline import artifacts as art
from pipeline.errors import PipelineError

STAGES = ("sft", "reward", "ppo", "eval")


def verify(artifact_dir: str, print_fn=print) -> list[str]:
    """One line per damaged stage (empty when every recorded file matches); prints a line per stage."""
    layout = art.Layout(artifact_dir)
    damaged = []
    for stage in STAGES:
        d = layout.stage(stage)
        manifest = art.read_manifest(d)
        if manifest is None:
            print_fn(f"{stage:<7} {'not present' if not d.exists() else 'incomplete (no manifest.json)'}")
            continue
        files = manifest.get("files") or {}
        try:
            art.check_files(d, manifest, hashes=True)
        except PipelineError as e:
            damaged.append(str(e))
            print_fn(f"{stage:<7} DAMAGED: {e}")
            continue
        size = sum(f["size"] for f in files.values()) / 2**20
        print_fn(f"{stage:<7} ok: {len(files)} weight files, {size:.0f} MiB, sha256 as recorded")
    return damaged


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact_dir", default="artifacts")
    args = parser.parse_args(argv)
    damaged = verify(args.artifact_dir)
    if damaged:
        print(f"error: {len(damaged)} damaged stage(s); rerun each with --force", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
