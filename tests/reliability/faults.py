"""Run a stage and SIGKILL it at an exact point of the real code (the fault-injection harness).

    python -m tests.reliability.faults POINT MODULE [STAGE ARGS...]

POINT is one of:

- ``mid_checkpoint:N``: while PPO writes checkpoint N, right after its optimizer file is written and cut in
  half (a checkpoint caught mid-write);
- ``after_manifest``: right after a stage's ``manifest.json`` is written into its staging directory, before
  the rename that publishes it;
- ``between_renames``: when a stage publishes over a previous artifact, after the previous one is renamed
  aside and before the new one is renamed into place.

The code under test is not changed: the harness wraps the library calls it makes at those points.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    from pipeline import artifacts

    if point.startswith("mid_checkpoint:"):
        from pipeline.ppo import checkpoint

        name = checkpoint.iteration_dir(Path("."), int(point.split(":")[1])).name
        real_save = checkpoint.save_file

        def save_file(tensors, path, *a, **k):
            real_save(tensors, path, *a, **k)
            if path.endswith("optimizer.safetensors") and f".tmp-{name}" in path:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()

        checkpoint.save_file = save_file
    elif point == "after_manifest":
        real_manifest = artifacts.StageWriter.write_manifest

        def write_manifest(self, *a, **k):
            real_manifest(self, *a, **k)
            die()

        artifacts.StageWriter.write_manifest = write_manifest
    elif point == "between_renames":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            src, dst = Path(src), Path(dst)
            if src.name.endswith(".staging") and (dst.parent / f".{dst.name}.old").exists():
                die()  # the previous artifact is aside, the new one not yet in place
            return real_replace(src, dst, *a, **k)

        artifacts.os.replace = replace
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, module, *args = sys.argv[1:]
    install(point)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
