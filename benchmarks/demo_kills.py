"""Kill `rlhf demo` with SIGKILL during SFT, during PPO and during the evaluation, rerun it after each kill, and
check that the final report equals an uninterrupted demo's.

    .venv/bin/python benchmarks/demo_kills.py --artifact_dir runs/demo-kills --reference artifacts

``--reference`` is the artifact directory of an uninterrupted `rlhf demo` made by this code on this machine (the
demo is deterministic on one machine, so the two reports must be equal number for number).

Each kill waits until the stage has written a checkpoint (SFT: an HF Trainer checkpoint in ``sft-run/``; PPO: an
iteration checkpoint in ``ppo-run/checkpoints/``; evaluation: a finished policy's results in ``eval-run/``), lets
the stage work ``--after`` seconds more, and kills the demo's whole process group, as a preempted machine would.
The rerun is the same plain command. Recorded per kill, in ``<artifact_dir>/kills.json``:

- ``work_since_checkpoint_s``: the seconds between the newest checkpoint's write and the kill, which the rerun
  must do again;
- ``rerun_stage_s`` and ``killed_stage_s``: the killed stage's wall time before the kill and in the rerun;
- ``rerun_skips_s``: the rerun's time to pass the stages completed before the killed one;
- at the end, each stage's total over all attempts and the whole wall time.

A kill of the demo process group takes the stage child with it; the script then checks no stage process is
left running before it reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.demo import STEPS  # noqa: E402

STAGES = tuple(title for title, _, _ in STEPS)  # the titles `rlhf demo` prints, in order
# (stage title, checkpoint glob under the artifact dir, what a checkpoint is)
KILL_POINTS = {
    "sft": ("SFT", "sft-run/checkpoint-*", "HF Trainer checkpoint"),
    "ppo": ("PPO", "ppo-run/checkpoints/iter-*/checkpoint.json", "PPO iteration checkpoint"),
    "eval": ("evaluation", "eval-run/*.json", "a finished policy's results"),
}
STAGE_LINE = re.compile(r"^=== (.+?) \(configs/")


class Demo:
    """One `rlhf demo` attempt in its own process group; its output is echoed to a log with a timestamp per
    line, and stage starts are recorded."""

    def __init__(self, artifact_dir: Path, log):
        self.t0 = time.time()
        self.stage_starts: list[tuple[str, float]] = []
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "demo", "--artifact_dir", str(artifact_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            now = time.time()
            m = STAGE_LINE.match(line.strip())
            if m:
                self.stage_starts.append((m.group(1), now))
            self.log.write(f"[{now - self.t0:8.1f}] {line}")
            self.log.flush()

    def current_stage(self) -> str | None:
        return self.stage_starts[-1][0] if self.stage_starts else None

    def kill(self) -> float:
        t = time.time()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        return t

    def wait(self) -> int:
        rc = self.proc.wait()
        self.reader.join(timeout=10)
        return rc

    def stage_times(self, end: float) -> dict[str, float]:
        bounds = [t for _, t in self.stage_starts[1:]] + [end]
        return {name: b - t for (name, t), b in zip(self.stage_starts, bounds)}


def newest(artifact_dir: Path, pattern: str) -> Path | None:
    found = [p for p in artifact_dir.glob(pattern)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def stage_processes(artifact_dir: Path) -> list[str]:
    """Command lines of processes still working on ``artifact_dir`` (a stage outliving its demo)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if "pipeline.stage_" in line and str(artifact_dir) in line]


def comparable(report: dict) -> dict:
    """A report without what names the directory it was made in."""
    return {k: v for k, v in report.items() if k != "config"}


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact_dir", default="runs/demo-kills", help="a new artifact directory for the killed demo")
    ap.add_argument("--reference", required=True, help="artifact dir of an uninterrupted demo on this machine")
    ap.add_argument("--points", nargs="+", default=["sft", "ppo", "eval"], choices=sorted(KILL_POINTS))
    ap.add_argument("--after", type=float, default=60.0, help="seconds of work after a checkpoint before the kill")
    args = ap.parse_args(argv)
    art = Path(args.artifact_dir).resolve()
    ref_report = Path(args.reference) / "eval" / "report.json"
    if not ref_report.exists():
        print(f"error: {ref_report} does not exist; run `rlhf demo --artifact_dir {args.reference}` first")
        return 2
    if (art / "eval" / "manifest.json").exists():
        print(f"error: {art} already holds a finished demo; give a new --artifact_dir")
        return 2
    art.mkdir(parents=True, exist_ok=True)
    record_path = art / "kills.json"
    record = {"kills": [], "attempts": []}
    log = open(art / "demo_kills.log", "a")
    t_start = time.time()
    for point in args.points:
        title, pattern, what = KILL_POINTS[point]
        demo = Demo(art, log)
        killed_at = None
        while demo.proc.poll() is None:
            ck = newest(art, pattern) if demo.current_stage() == title else None
            if ck is not None and time.time() - ck.stat().st_mtime >= args.after:
                ck_time = ck.stat().st_mtime
                killed_at = demo.kill()
                break
            time.sleep(1)
        if killed_at is None:
            print(f"error: the demo ended (exit {demo.wait()}) before the {point} kill point; see {log.name}")
            return 1
        time.sleep(2)
        left = stage_processes(art)
        stage_start = dict(demo.stage_starts)[title]
        kill = {
            "point": point,
            "checkpoint": str(ck.relative_to(art)),
            "checkpoint_kind": what,
            "work_since_checkpoint_s": round(killed_at - ck_time, 1),
            "killed_stage_s": round(killed_at - stage_start, 1),
            "stage_processes_left": left,
        }
        record["attempts"].append({"killed": point, "stage_s": demo.stage_times(killed_at)})
        record["kills"].append(kill)
        print(f"demo_kills: killed during {title} {kill['work_since_checkpoint_s']} s after {kill['checkpoint']}")
        if left:
            print(f"error: stage processes outlived the killed demo: {left}")
            return 1
        record_path.write_text(json.dumps(record, indent=2))
    demo = Demo(art, log)
    rc = demo.wait()
    end = time.time()
    record["attempts"].append({"killed": None, "stage_s": demo.stage_times(end), "exit": rc})
    if rc != 0:
        print(f"error: the final rerun failed (exit {rc}); see {log.name}")
        record_path.write_text(json.dumps(record, indent=2))
        return 1
    for kill, nxt in zip(record["kills"], record["attempts"][1:]):
        title = KILL_POINTS[kill["point"]][0]
        kill["rerun_stage_s"] = round(nxt["stage_s"].get(title, 0.0), 1)
        # The rerun passes the stages completed before the killed one: each loads its manifest and skips.
        before = STAGES[: STAGES.index(title)]
        kill["rerun_skips_s"] = round(sum(nxt["stage_s"].get(t, 0.0) for t in before), 1)
    totals: dict[str, float] = {}
    for attempt in record["attempts"]:
        for name, secs in attempt["stage_s"].items():
            totals[name] = totals.get(name, 0.0) + secs
    record["stage_total_s"] = {k: round(v, 1) for k, v in totals.items()}
    record["wall_s"] = round(end - t_start, 1)
    diffs = differences(
        comparable(json.loads(ref_report.read_text())),
        comparable(json.loads((art / "eval" / "report.json").read_text())),
    )
    record["report_equal_to_reference"] = not diffs
    record["report_differences"] = diffs[:50]
    record_path.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "attempts"}, indent=2))
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
