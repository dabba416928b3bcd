"""glibc's malloc tuning (pipeline/allocator.py): who gets it, and that glibc really applies it after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import allocator
from pipeline.artifacts import REPO_ROOT

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc ")
GPU = any(os.path.exists(dev) for dev in allocator.GPU_DEVICES)
TUNED = GLIBC and not GPU
# Restart through the entry point, then malloc 100 MB: with the settings it comes from the heap ([heap] in
# /proc/self/maps), by default from an mmap of its own.
PROBE = """
import ctypes, json, os, sys
sys.path.insert(0, {root!r})
from pipeline.allocator import restart_with_tuned_malloc
restart_with_tuned_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(100 << 20)
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
in_heap = any(int(a, 16) <= p < int(b, 16) for a, b in heap)
print(json.dumps({{"tunables": os.environ.get("GLIBC_TUNABLES"), "in_heap": in_heap, "argv": sys.argv[1:]}}))
"""


def probe(tmp_path, env_extra: dict, drop=()) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(REPO_ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(script), "a b", "--x"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tuned_env_adds_the_settings_once_and_respects_the_users():
    base = {"PATH": "/bin"}
    if not TUNED:
        assert allocator.tuned_env(base) == base
        return
    env = allocator.tuned_env(base)
    assert env["GLIBC_TUNABLES"] == allocator.TUNABLES and base == {"PATH": "/bin"}  # a copy
    assert allocator.tuned_env(env) == env  # already in force: nothing added twice
    other = allocator.tuned_env({"GLIBC_TUNABLES": "glibc.rtld.nns=4"})["GLIBC_TUNABLES"]
    assert other == "glibc.rtld.nns=4:" + allocator.TUNABLES  # other tunables kept
    for own in (
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_ARENA_MAX": "2"},
        {allocator.OPT_OUT: "0"},
    ):
        assert allocator.tuned_env(own) == own


def test_hosts_with_a_gpu_keep_the_defaults(monkeypatch):
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidiactl" or real(p))
    assert allocator.tuned_env({"PATH": "/bin"}) == {"PATH": "/bin"}


@pytest.mark.skipif(not TUNED, reason="glibc on a host without a GPU only")
def test_restart_applies_the_settings_and_keeps_the_command_line(tmp_path):
    tuned = probe(tmp_path, {})
    assert tuned == {"tunables": allocator.TUNABLES, "in_heap": True, "argv": ["a b", "--x"]}
    default = probe(tmp_path, {allocator.OPT_OUT: "0"})
    assert default["tunables"] is None and default["in_heap"] is False  # the probe can tell the two apart


@pytest.mark.skipif(not TUNED, reason="glibc on a host without a GPU only")
def test_the_demo_starts_its_stages_with_the_settings(monkeypatch):
    from pipeline.demo import run_stage

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    check = f"import os, sys; sys.exit(0 if os.environ.get('GLIBC_TUNABLES') == {allocator.TUNABLES!r} else 3)"
    assert run_stage([sys.executable, "-c", check]) == 0
