"""Compare the recorded metrics of two artifact directories, number by number.

    python scripts/compare_artifacts.py artifacts_a artifacts_b [--ignore time/ --ignore train_runtime]

For each of ``sft``, ``reward`` and ``ppo`` present in both: the numbers in the stage manifest's
``metrics`` (SFT and reward: train loss, log history, held-out accuracy) and, for PPO, every row of
``metrics.jsonl``. Prints each difference and a summary line per stage; exits 1 when a number differs
(keys present on one side only are listed but do not count). Wall-clock fields are ignored by default.
Use it to check that a change which should not change what is learned changed nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_IGNORE = ("time/", "train_runtime", "seconds_per_iteration", "_runtime", "_per_second")


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path (``metrics.log_history.3.loss``)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def stage_numbers(stage_dir: Path) -> dict[str, float]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    numbers = flatten(manifest.get("metrics", {}), "metrics.")
    metrics = stage_dir / "metrics.jsonl"
    if metrics.exists():
        for i, line in enumerate(metrics.read_text().splitlines()):
            numbers.update(flatten(json.loads(line), f"metrics.jsonl.{i}."))
    return numbers


def compare(a: dict[str, float], b: dict[str, float], ignore: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(differences, keys on one side only), ignoring keys that contain any of ``ignore``."""
    keep = [k for k in sorted(set(a) | set(b)) if not any(s in k for s in ignore)]
    one_sided = [k for k in keep if (k in a) != (k in b)]
    diffs = [
        f"{k}: {a[k]!r} != {b[k]!r}"
        for k in keep
        if k in a and k in b and not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))
    ]
    return diffs, one_sided


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore", action="append", default=list(DEFAULT_IGNORE), help="skip keys containing this")
    args = ap.parse_args(argv)
    status = 0
    for stage in ("sft", "reward", "ppo"):
        if not ((args.a / stage / "manifest.json").exists() and (args.b / stage / "manifest.json").exists()):
            continue
        a, b = stage_numbers(args.a / stage), stage_numbers(args.b / stage)
        diffs, one_sided = compare(a, b, tuple(args.ignore))
        for line in diffs:
            print(f"{stage}: {line}")
        compared = len([k for k in set(a) & set(b) if not any(s in k for s in args.ignore)])
        only = f"; only on one side: {', '.join(one_sided)}" if one_sided else ""
        print(f"{stage}: {compared} numbers compared, {len(diffs)} differ{only}")
        status |= bool(diffs)
    return status


if __name__ == "__main__":
    sys.exit(main())
