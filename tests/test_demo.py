"""Tests of ``pipeline/demo.py``: a stage's process never outlives the demo, signals reach it, and the bf16 recipes
run in fp32 where bf16 is emulated."""

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


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_runs_bf16_recipes_in_fp32_where_bf16_is_emulated(monkeypatch, capsys, native):
    """Without AVX512-BF16/AMX (or a bf16 GPU) SFT, the reward model and the evaluation get ``--bf16 false``; PPO
    decides for itself (``--dtype auto``). Where bf16 is native the recipes run as written."""
    from pipeline import demo

    calls = []
    monkeypatch.setattr(demo, "native_bf16_here", lambda: native)
    monkeypatch.setattr(demo, "run_stage", lambda cmd: calls.append(cmd) or 0)
    assert demo.cli(["--artifact_dir", "unused"]) == 0
    by_module = {cmd[2]: cmd[3:] for cmd in calls}
    assert list(by_module) == [module for _, module, _ in demo.STEPS]
    for module, argv in by_module.items():
        fp32 = not native and module != "pipeline.stage_ppo"
        assert (argv[-2:] == ["--bf16", "false"]) is fp32, (module, argv)
    assert ("no native bf16" in capsys.readouterr().out) is not native


def test_a_stage_warns_in_one_line_when_bf16_would_be_emulated(monkeypatch, capsys):
    from pipeline import modeling

    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    modeling.warn_if_emulated_bf16("sft", True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bf16 false" in err[0]
    modeling.warn_if_emulated_bf16("sft", False)
    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    modeling.warn_if_emulated_bf16("sft", True)
    assert capsys.readouterr().err == ""
