"""glibc's malloc set to keep the memory a process frees for reuse, instead of handing it back to the kernel.

By default glibc serves every allocation over 32 MB with a fresh ``mmap`` and unmaps it on ``free``, and it
returns freed memory at the top of its heap to the kernel; the kernel then zeroes each page again on its next
first touch. The stages allocate and free such blocks at every step (logits of ``[rows, tokens, 49k]``, their
float32 log-softmax, gradients): the demo took ~27M page faults and spent 8% of its CPU time in the kernel.
``mmap_max=0`` serves large blocks from the heap too, and a trim threshold of 1 TB keeps freed memory mapped,
so the next block reuses pages already touched. The cost: a process keeps its peak memory until it exits (each
stage is its own process). Nothing computed changes, only where the memory comes from (docs/design.md). Only on
hosts without a GPU: there a process would keep a model's host copy after moving it to the GPU.

glibc reads these settings (``GLIBC_TUNABLES``) once, when a process starts, and ``mallopt`` cannot set a trim
threshold over 2 GB. So a stage started from a shell re-executes itself once with them
(:func:`restart_with_tuned_malloc`), and the demo starts its stages with them (:func:`tuned_env`).
``RLHF_TUNE_MALLOC=0`` keeps glibc's defaults; a malloc setting of your own (``GLIBC_TUNABLES`` or
``MALLOC_*``) is left as it is; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import os
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
OPT_OUT = "RLHF_TUNE_MALLOC"
# A GPU driver's device node: models are loaded on the host, then moved; a process that kept that memory would
# hold a model's host copy to its end, and the hot loop allocates little host memory to gain from.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")


def applies(env: dict | None = None) -> bool:
    """Whether a process started with ``env`` (default: this one's) should get the settings: glibc on Linux, no
    GPU driver (CUDA, ROCm), not opted out, and no malloc setting in it yet (the user's own, or ours from a
    restart)."""
    env = os.environ if env is None else env
    if env.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(os.path.exists(dev) for dev in GPU_DEVICES):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc "):
            return False
    except (ValueError, OSError):  # not glibc
        return False
    own = "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in env)
    return not own


def tuned_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: this process's) with the malloc settings added where :func:`applies`."""
    env = dict(os.environ if env is None else env)
    if applies(env):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLES]))
    return env


def restart_with_tuned_malloc() -> None:
    """Replace this process with itself under the tuned malloc settings, once, before any real work; nothing
    happens where they do not apply or are already in force. Only for a program's entry point (``__main__``):
    it restarts the interpreter with the same command line."""
    if not applies():
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, tuned_env())
