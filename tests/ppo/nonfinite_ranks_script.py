"""Run under ``accelerate launch --multi_gpu --num_processes 2``: checks that ``NonFiniteGuard`` makes every
rank skip a step when the loss is non-finite on one rank only (the gradient norm being finite everywhere).
Usage: ``ppo_finite_ranks_script.py OUT_DIR``; each rank writes ``OUT_DIR/rank-<r>.json`` with
``{"rank": r, "decisions": [...], "in_a_row": n, "total": n}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from pipeline.ppo.trainer import NonFiniteGuard  # noqa: E402


def main() -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    guard = NonFiniteGuard(acc, max_in_a_row=3)
    nan_on = {0: 1, 1: 1, 2: 0}  # step -> the rank whose loss is NaN (rank 1, rank 1, rank 0)
    decisions = []
    for step in range(4):
        bad = nan_on.get(step) == acc.process_index
        loss = torch.tensor(float("nan") if bad else 0.5)
        decisions.append(guard.step_ok(loss, torch.tensor(1.0)))
    result = {
        "rank": acc.process_index,
        "decisions": decisions,
        "in_a_row": guard.in_a_row,
        "total": guard.total,
    }
    (Path(sys.argv[1]) / f"rank-{acc.process_index}.json").write_text(json.dumps(result))
    acc.end_training()  # destroys the process group; exiting with it alive can abort a rank


if __name__ == "__main__":
    main()
