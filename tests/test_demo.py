"""Tests of ``pipeline/demo.py``: a stage's process never outlives the demo, and signals reach it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The demo's stage runner on a stand-in stage that reports its pid and waits.
DEMO = (
    "import sys; from pipeline.demo import run_stage\n"
    "stage = 'import os, time; print(os.getpid(), flush=True); time.sleep(120)'\n"
    "sys.exit(run_stage([sys.executable, '-c', stage]))\n"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has finished
        return f.read().split()[2] != "Z"


def wait_dead(pid: int, seconds: float = 20) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stage_process_ends_with_the_demo(sig):
    demo = subprocess.Popen([sys.executable, "-c", DEMO], stdout=subprocess.PIPE, text=True, cwd=REPO)
    stage_pid = int(demo.stdout.readline())
    assert alive(stage_pid)
    demo.send_signal(sig)
    demo.wait(timeout=30)
    assert wait_dead(stage_pid), f"stage process {stage_pid} outlived the demo ({sig.name})"
    if sig == signal.SIGTERM:
        assert demo.returncode == 128 + signal.SIGTERM  # the stage's end by SIGTERM, passed on
